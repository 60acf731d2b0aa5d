#version 330 core
// Camera-space face normal as colour, (n + 1) / 2, unlit.
// The screen-space derivatives of the interpolated camera-space position span the triangle's
// plane, so their cross product is the face's geometric normal (facing the viewer); a triangle
// seen from its back (only drawn when culling is off) gets the opposite, true winding normal.
in vec3 cam_position;
out vec4 frag_color;

void main()
{
    vec3 n = normalize(cross(dFdx(cam_position), dFdy(cam_position)));
    if (!gl_FrontFacing) {
        n = -n;
    }
    frag_color = vec4(n * 0.5 + 0.5, 1.0);
}
