"""`judge3d serve` and the OpenAI-compatible client against it, on a tiny saved Qwen2.5-VL judge."""
from __future__ import annotations

import base64
import io
import math
import socket
import threading
import time
import types

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("openai")

from PIL import Image  # noqa: E402

from judge3d import cli  # noqa: E402
from pathlib import Path  # noqa: E402
from judge3d.judges.hf import HFJudge, prompt_content  # noqa: E402
from judge3d.judges.openai_client import AnswerError, OpenAIJudge, p_first_from_top_logprobs  # noqa: E402
from judge3d.judges.protocol import Pair, pair_verdicts, run_pairs  # noqa: E402
from judge3d.judges.serve import TOKEN_ENV, make_app, parse_request  # noqa: E402
from judge3d.judges.tiny import TinyLMSize, TinySizes, TinyVisionSize, build_tiny_qwen25vl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

SMALL = TinySizes(lm=TinyLMSize(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128),
                  vision=TinyVisionSize(hidden=32, depth=2, heads=2, intermediate=64, patch=14), image_size=56)
TOKEN = "s3cret-test-token"
MAX_PIXELS = 128 * 128
PROMPTS = ["Which 3D reconstruction is better, the first or the second image? Answer A or B.",
           "A: <image1> B: <image2> Which is the better reconstruction? Answer A or B."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    build_tiny_qwen25vl(root / "qwen", SMALL, seed=3)
    return root / "qwen"


@pytest.fixture(scope="module")
def local_judge(judge_dir):
    return HFJudge.load(judge_dir, batch_size=4)


@pytest.fixture(scope="module")
def server(judge_dir):
    """The served judge (its own HFJudge instance) on a free loopback port, behind TOKEN."""
    judge = HFJudge.load(judge_dir, batch_size=4)
    app = make_app(judge, model_id=judge.judge_id.rsplit("@", 1)[0], revision=judge.weights_hash, token=TOKEN,
                   max_pixels=MAX_PIXELS)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def montages(tmp_path_factory):
    root = tmp_path_factory.mktemp("montages")
    rs = np.random.default_rng(0)
    paths = []
    for i in range(4):
        p = root / f"m{i}.{'jpg' if i == 3 else 'png'}"
        Image.fromarray((rs.random((64, 64, 3)) * 255).astype("uint8")).save(p)
        paths.append(str(p))
    return paths


def _url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _body(urls, max_tokens=1, text="Which is better? Answer A or B."):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "logprobs": True,
            "top_logprobs": 5}


def _post(server, body, token=TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{server}/chat/completions", json=body, headers=headers, timeout=30)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_served_p_first_equals_in_process(server, local_judge, montages, prompt):
    remote = OpenAIJudge(server, api_key=TOKEN, workers=3)
    assert remote.judge_id == local_judge.judge_id  # model name + the server-reported weights hash
    pairs = [(montages[0], montages[1]), (montages[1], montages[0]), (montages[2], montages[3]),
             (montages[3], montages[2])]
    want = local_judge.p_first(pairs, prompt)
    got = remote.p_first(pairs, prompt)
    assert np.all((want > 0) & (want < 1))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_run_pairs_gives_the_same_verdicts_through_both_backends(server, local_judge, montages, tmp_path):
    pairs = [Pair(f"p{i}", "obj", montages[i], montages[i + 1]) for i in range(3)]
    rows = {}
    for name, backend in (("hf", local_judge), ("openai", OpenAIJudge(server, api_key=TOKEN))):
        rows[name] = run_pairs(backend, pairs, tmp_path / f"{name}.jsonl", PROMPTS[1], batch_size=4,
                               show_progress=False)
    assert len(rows["hf"]) == len(rows["openai"]) == 6
    for a, b in zip(rows["hf"], rows["openai"]):
        assert (a["pair_id"], a["order"], a["verdict"], a["key"]) == (b["pair_id"], b["order"], b["verdict"], b["key"])
        assert abs(a["p_first"] - b["p_first"]) <= 1e-6
    for a, b in zip(pair_verdicts(rows["hf"]), pair_verdicts(rows["openai"])):
        assert (a["v1"], a["v2"], a["consistent"], a["winner"]) == (b["v1"], b["v2"], b["consistent"], b["winner"])
        assert abs(a["soft"] - b["soft"]) <= 1e-6


def test_answer_is_a_renormalised_two_letter_distribution(server):
    ims = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    r = _post(server, _body([_url(im) for im in ims]))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    top = {t["token"]: t["logprob"] for t in choice["logprobs"]["content"][0]["top_logprobs"]}
    assert set(top) == {"A", "B"}
    assert math.isclose(math.exp(top["A"]) + math.exp(top["B"]), 1.0, abs_tol=1e-12)
    assert choice["message"]["content"] == max(top, key=top.get)


def test_models_lists_the_judge_with_its_weights_hash(server, local_judge):
    r = httpx.get(f"{server}/models", headers={"Authorization": f"Bearer {TOKEN}"})
    (model,) = r.json()["data"]
    assert model["revision"] == local_judge.weights_hash
    assert f"{model['id']}@{model['revision'][:12]}" == local_judge.judge_id


def test_wrong_or_missing_token_is_401(server):
    ims = [_url(Image.new("RGB", (64, 64)))] * 2
    for token in ("wrong", None):
        r = _post(server, _body(ims), token=token)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/models").status_code == 401


def test_bad_requests_are_4xx_naming_the_problem(server):
    good = _url(Image.new("RGB", (64, 64), "green"))
    cases = [
        (_body([good, "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA"]), "image 2: not a readable"),
        (_body([good, "data:image/png;base64,@@@not-base64@@@"]), "image 2: malformed base64"),
        (_body([good] * 4), "the message has 4 image_url parts"),
        (_body([good]), "the message has 1"),
        (_body([good, good], max_tokens=5), "max_tokens must be 1"),
        (_body([_url(Image.new("RGB", (200, 200))), good]), f"image 1: 200x200 = 40000 pixels, over the server's "
                                                             f"limit of {MAX_PIXELS}"),
        (_body([good, "https://example.com/a.png"]), "image 2: image_url.url must be a data: URL"),
        ({**_body([good, good]), "logprobs": False}, "logprobs must be true"),
    ]
    for body, needle in cases:
        r = _post(server, body)
        assert 400 <= r.status_code < 500, (needle, r.status_code, r.text)
        assert needle in r.json()["error"]["message"], (needle, r.text)


REF_PROMPTS = ["Input: <image0> A: <image1> B: <image2> Which is the better reconstruction? Answer A or B.",
               "<image0><image1><image2>Which is better? A or B."]


@pytest.mark.parametrize("prompt, n_images", [(p, 2) for p in PROMPTS + ["<image1> vs <image2>: which? A or B",
                                                                         "<image1><image2> A or B?"]]
                         + [(p, 3) for p in REF_PROMPTS])
def test_server_rebuilds_the_chat_content_the_judge_builds(prompt, n_images):
    """Two montages, or a reference-aware prompt's input image and two montages."""
    url = _url(Image.new("RGB", (8, 8)))
    content = [{"type": "image_url", "image_url": {"url": url}} if p["type"] == "image" else p
               for p in prompt_content(prompt)]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1, "logprobs": True,
            "top_logprobs": 2}
    rebuilt, images = parse_request(body, 10 ** 6, 10 ** 6)
    assert len(images) == n_images and prompt_content(rebuilt) == prompt_content(prompt)
    if n_images == 3:
        assert rebuilt == prompt


def test_served_reference_aware_p_first_equals_in_process(server, local_judge, montages):
    remote = OpenAIJudge(server, api_key=TOKEN, workers=2)
    queries = [(montages[2], montages[0], montages[1]), (montages[2], montages[1], montages[0]),
               (montages[3], montages[0], montages[1])]
    want = local_judge.p_first(queries, REF_PROMPTS[0])
    np.testing.assert_allclose(remote.p_first(queries, REF_PROMPTS[0]), want, rtol=0, atol=1e-6)
    assert want[0] != want[2]      # the reference is part of what the judge sees
    with pytest.raises(ValueError, match="query 0 has 2 images but the prompt shows 3"):
        remote.p_first([(montages[0], montages[1])], REF_PROMPTS[0])


def test_non_loopback_host_without_token_refuses_to_start(judge_dir, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert cli.main(["serve", str(judge_dir), "--host", "0.0.0.0", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve" in err and "--token" in err and TOKEN_ENV in err


def test_top_logprobs_combine_letter_variants_and_renormalise():
    p = p_first_from_top_logprobs([("A", math.log(0.2)), (" A", math.log(0.1)), ("B", math.log(0.3)),
                                   ("C", math.log(0.4))])
    assert math.isclose(p, 0.3 / 0.6, rel_tol=1e-12)
    assert p_first_from_top_logprobs([(" B", -0.1)]) == 0.0
    assert p_first_from_top_logprobs([("C", -0.1), ("a", -2.0)]) is None


def test_answer_without_either_letter_names_the_query(server, montages):
    remote = OpenAIJudge(server, api_key=TOKEN, workers=1)  # one thread: the stub answers in query order

    def answer(tokens):
        top = [types.SimpleNamespace(token=t, logprob=-0.1 - i) for i, t in enumerate(tokens)]
        return types.SimpleNamespace(choices=[types.SimpleNamespace(logprobs=types.SimpleNamespace(
            content=[types.SimpleNamespace(top_logprobs=top)]))])

    answers = iter([answer(["A", "B"]), answer(["C", "D"])])  # query 0 is fine, query 1 has neither letter
    remote.client = types.SimpleNamespace(chat=types.SimpleNamespace(
        completions=types.SimpleNamespace(create=lambda **_: next(answers))))
    with pytest.raises(AnswerError, match=rf"query 1 \(first={montages[2]}, second={montages[0]}\): neither answer"):
        remote.p_first([(montages[0], montages[1]), (montages[2], montages[0])], PROMPTS[0])


def test_params_name_a_server_and_the_pipeline_judges_through_it(server, local_judge, montages, monkeypatch):
    """judge.servers.<role> in params.yaml turns the pipeline's judge (load_judge) into a client of that
    server, asking for judges.<role>.model; null keeps it in-process."""
    import copy

    from judge3d.core.config import ParamsError, load_params
    from judge3d.pipeline.judging import load_judge

    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    assert params["judge"]["servers"] == {"train": None, "eval": None}    # the default: in-process
    monkeypatch.setenv("JUDGE3D_SERVE_TOKEN", TOKEN)
    params["judge"]["servers"]["eval"] = server
    params["judges"]["eval"]["model"] = local_judge.judge_id.rsplit("@", 1)[0]
    remote = load_judge(params, "eval")
    assert isinstance(remote, OpenAIJudge) and remote.judge_id == local_judge.judge_id
    pairs = [(montages[0], montages[1]), (montages[1], montages[0])]
    prompt = params["judge"]["prompt"]
    np.testing.assert_allclose(remote.p_first(pairs, prompt), local_judge.p_first(pairs, prompt), rtol=0, atol=1e-6)
    params["judge"]["servers"]["eval"] = "  "
    with pytest.raises(ParamsError, match="judge.servers.eval"):
        load_judge(params, "eval")
