#version 330 core
// judge3d normal-map pass: pyrender's FLAT program slot, replaced. Passes the camera-space position;
// the fragment shader derives the exact face normal from it.
layout(location = 0) in vec3 position;
layout(location = INST_M_LOC) in mat4 inst_m;

uniform mat4 M;
uniform mat4 V;
uniform mat4 P;

out vec3 cam_position;

void main()
{
    vec4 cam = V * M * inst_m * vec4(position, 1.0);
    cam_position = cam.xyz;
    gl_Position = P * cam;
}
