"""Publishing: `train --push_to_hub` against a local stand-in for the Hub's HTTP API, `push --dry_run`, the model
card and the training report.

The Hub is the one thing tests cannot reach, so huggingface_hub is intercepted at its HTTP layer: a server on
127.0.0.1 answers the endpoints that create_repo and upload_folder call (HF_ENDPOINT points there). Everything
above HTTP (staging, card, huggingface_hub's commit logic) is the real code.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from PIL import Image

from flowers_ddpm.cli import main

from .conftest import flowers_ddpm, tiny_train_args

FAKE_TOKEN = "hf_fakeTokenForTests0123456789abcdef"
REPO_ID = "someone/flowers-test"
WRITES = ("/api/repos/", "/api/models/")  # the calls that need the token


class FakeHub(BaseHTTPRequestHandler):
    """The Hub API endpoints of create_repo, create_branch, README validation, preupload and commit; anything else
    is a 404."""

    calls: list[tuple[str, str, str]] = []  # (method, path, authorization header)
    commits: list[dict] = []  # {"revision", "summary", "files": {path: bytes}}
    created: list[dict] = []  # create_repo payloads

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        FakeHub.calls.append(("GET", self.path, self.headers.get("authorization", "")))
        self._reply(404, {"error": "not found"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        path = self.path.split("?")[0]
        FakeHub.calls.append(("POST", path, self.headers.get("authorization", "")))
        host = f"http://{self.headers['host']}"
        if path == "/api/repos/create":
            payload = json.loads(body)
            FakeHub.created.append(payload)
            return self._reply(200, {"url": f"{host}/{payload['organization']}/{payload['name']}"})
        if "/branch/" in path:  # create_branch
            return self._reply(200, {})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            commit = {"revision": path.rsplit("/", 1)[1], "summary": lines[0]["value"]["summary"], "files": {}}
            for line in lines[1:]:
                assert line["key"] == "file", line  # everything was declared "regular": content is inline
                commit["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            FakeHub.commits.append(commit)
            return self._reply(200, {"commitUrl": f"{host}/{REPO_ID}/commit/abc123", "commitOid": "abc123",
                                     "pullRequestUrl": None})
        return self._reply(404, {"error": f"unexpected endpoint {path}"})


@pytest.fixture
def fake_hub():
    FakeHub.calls, FakeHub.commits, FakeHub.created = [], [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def hub_env(endpoint: str, home: Path) -> dict:
    return {"HF_ENDPOINT": endpoint, "HF_TOKEN": FAKE_TOKEN, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",  # plain commits; the Xet storage protocol is beyond this stand-in
            "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.mark.slow
def test_train_pushes_pipeline_with_card_and_dry_run_stages_the_same(image_folder, tmp_path, fake_hub):
    out = tmp_path / "run"
    result = flowers_ddpm("train", *tiny_train_args(image_folder, out, max_train_steps=2, save_images_steps=1,
                                                    logging_steps=1, push_to_hub=True, hub_model_id=REPO_ID),
                          env=hub_env(fake_hub, tmp_path / "hf_home"))
    assert result.returncode == 0, result.stderr[-3000:]

    # the report
    report = out / "report"
    assert {"loss_curve.png", "samples_over_training.png", "final_samples.png", "denoising.png",
            "loss.jsonl"} <= {p.name for p in report.iterdir()}
    assert [json.loads(line)["step"] for line in (report / "loss.jsonl").read_text().splitlines()] == [1, 2]

    # one commit holding exactly the pipeline folder plus the card and its images
    assert len(FakeHub.commits) == 1
    uploaded = FakeHub.commits[0]["files"]
    pipeline_files = sorted(p.relative_to(out / "pipeline").as_posix() for p in (out / "pipeline").rglob("*")
                            if p.is_file())
    images = ["images/denoising.png", "images/loss_curve.png", "images/samples.png", "images/samples_over_training.png"]
    assert sorted(uploaded) == sorted(pipeline_files + ["README.md"] + images)
    assert not any(name.startswith(("checkpoints", "logs", "samples", "report")) for name in uploaded)
    assert uploaded["unet/diffusion_pytorch_model.safetensors"] == (
        out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert uploaded["images/samples.png"] == (report / "final_samples.png").read_bytes()
    assert {path for method, path, _ in FakeHub.calls} >= {"/api/repos/create", f"/api/models/{REPO_ID}/commit/main"}
    assert all(auth == f"Bearer {FAKE_TOKEN}" for _, path, auth in FakeHub.calls  # the token came from HF_TOKEN
               if path.startswith(WRITES))

    # --dry_run stages byte for byte what was uploaded, without any request
    staging, calls_before = tmp_path / "staging", len(FakeHub.calls)
    assert main(["push", "--model", str(out / "pipeline"), "--repo_id", REPO_ID, "--dry_run",
                 "--staging_dir", str(staging)]) == 0
    staged = {p.relative_to(staging).as_posix(): p.read_bytes() for p in staging.rglob("*") if p.is_file()}
    assert staged == uploaded
    assert len(FakeHub.calls) == calls_before

    # the card: metadata, facts of the run, and a usage snippet that runs as written
    card = uploaded["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "diffusers"
    assert metadata["pipeline_tag"] == "unconditional-image-generation"
    assert {"diffusers", "ddpm", "custom-images"} <= set(metadata["tags"])
    assert metadata["license"] == "apache-2.0"
    assert "![Samples](images/samples.png)" in card
    assert "| setting | value |\n| --- | --- |\n| dataset |" in card  # a titled table, not an empty header row
    assert "| optimizer steps | 2 |" in card and "| hardware | 1 x CPU" in card
    shown = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])  # the configuration, without local paths
    assert shown["train_data_dir"] == image_folder.name and shown["output_dir"] == "run"
    assert shown["max_train_steps"] == 2
    assert str(tmp_path.parent) not in card  # the pytest base folder holds both the data and the run
    assert yaml.safe_load(uploaded["training_config.yaml"]) == shown  # the uploaded copy has no local paths either
    snippet = card.split("```python\n")[1].split("```")[0]
    assert f'from_pretrained("{REPO_ID}")' in snippet
    namespace: dict = {}
    local_snippet = snippet.replace(REPO_ID, str(staging)).replace('"sample.png"', repr(str(tmp_path / "s.png")))
    exec(compile(local_snippet, "card-snippet", "exec"), namespace)
    assert len(namespace["images"]) == 4 and (tmp_path / "s.png").is_file()

    # the token is in no file we wrote
    for path in [*out.rglob("*"), *staging.rglob("*"), *(tmp_path / "hf_home").rglob("*")]:
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_push_command_to_a_branch_of_a_private_repo(tmp_path, fake_hub, monkeypatch):
    import huggingface_hub.constants
    import torch

    from flowers_ddpm.models.unet import build_noise_scheduler, build_unet
    from flowers_ddpm.pipelines.export import export_pipeline

    # in this process: the same settings the environment gives a fresh process (see hub_env)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake_hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    torch.manual_seed(0)
    pipeline = export_pipeline(build_unet("tiny", 16), build_noise_scheduler(1000, "linear", "epsilon"),
                               tmp_path / "elsewhere")  # a pipeline without a run around it: the card samples it
    assert main(["push", "--model", str(pipeline), "--repo_id", REPO_ID, "--private", "--revision", "v1",
                 "--commit_message", "first version"]) == 0
    assert [(c["organization"], c["name"], c["visibility"]) for c in FakeHub.created] == [
        ("someone", "flowers-test", "private")]
    assert [c["revision"] for c in FakeHub.commits] == ["v1"]
    assert FakeHub.commits[0]["summary"] == "first version"
    assert sorted(FakeHub.commits[0]["files"]) == ["README.md", "images/samples.png", "model_index.json",
                                                   "scheduler/scheduler_config.json", "unet/config.json",
                                                   "unet/diffusion_pytorch_model.safetensors"]
    assert ("POST", f"/api/models/{REPO_ID}/branch/v1") in {(m, p) for m, p, _ in FakeHub.calls}
    assert all(auth == f"Bearer {FAKE_TOKEN}" for _, path, auth in FakeHub.calls if path.startswith(WRITES))
    # the card's hero image, sampled now for a pipeline without a run: 16 px images shown at 64 px
    hero = Image.open(io.BytesIO(FakeHub.commits[0]["files"]["images/samples.png"]))
    assert hero.size == (2 * 64, 2 * 64)


def test_dry_run_without_staging_dir_stages_in_a_new_temporary_folder(tmp_path, capsys):
    import torch

    from flowers_ddpm.models.unet import build_noise_scheduler, build_unet
    from flowers_ddpm.pipelines.export import export_pipeline

    torch.manual_seed(0)
    pipeline = export_pipeline(build_unet("tiny", 16), build_noise_scheduler(50, "linear", "epsilon"),
                               tmp_path / "elsewhere")
    assert main(["push", "--model", str(pipeline), "--repo_id", REPO_ID, "--dry_run"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    staging = Path(first.split(" files from ")[1].split(" to ")[0])
    assert first.startswith("dry run: would upload") and staging.name.startswith("flowers-ddpm-push-")
    assert (staging / "README.md").is_file() and (staging / "images" / "samples.png").is_file()
    shutil.rmtree(staging)


@pytest.mark.slow
def test_push_without_token_is_a_user_error(tmp_path):
    result = flowers_ddpm("push", "--model", str(tmp_path), "--repo_id", REPO_ID,
                          env={"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf_home")})
    assert result.returncode == 2
    assert "needs a token" in result.stderr


def test_card_of_a_flowers_fine_tune_has_base_model_dataset_and_metrics(tmp_path):
    from flowers_ddpm.publish.hub import build_model_card

    pipeline = tmp_path / "run" / "pipeline"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    (pipeline / "unet" / "config.json").write_text(json.dumps({"sample_size": 64}))
    (pipeline / "training_config.yaml").write_text(yaml.safe_dump(
        {"dataset_name": "nelorth/oxford-flowers", "dataset_split": "all", "train_data_dir": None,
         "init_from": "google/ddpm-cifar10-32", "lora_rank": 8}))
    # best/metrics.json of the evaluation during training: one flat row
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(
        {"step": 500, "scheduler": "ddim", "steps": 50, "num_images": 10000, "fid": 23.456789, "kid_mean": 0.0123,
         "feature_network": "inception-v3-compat"}))
    card = build_model_card(pipeline, REPO_ID, ["samples.png"], license="mit")
    assert card.data.base_model == "google/ddpm-cifar10-32" and card.data.license == "mit"
    assert card.data.datasets == ["nelorth/oxford-flowers"] and "flowers102" in card.data.tags
    assert "rank-8 LoRA" in card.text and "64x64" in card.text
    # the metrics as a table and as Hub model-index metadata
    assert "| sampler | steps | FID | KID |" in card.text and "| ddim | 50 | 23.46 | 0.01230 |" in card.text
    assert "```json" not in card.text and "not comparable" not in card.text
    index = yaml.safe_load(str(card).split("---")[1])["model-index"][0]
    assert index["name"] == "flowers-test"
    (result,) = index["results"]
    assert result["task"]["type"] == "unconditional-image-generation"
    assert result["dataset"]["type"] == "nelorth/oxford-flowers" and result["dataset"]["split"] == "all"
    assert [(m["type"], m["value"], m["name"]) for m in result["metrics"]] == [
        ("fid", 23.45679, "FID (ddim, 50 steps)"), ("kid", 0.0123, "KID (ddim, 50 steps)")]


def test_report_shows_the_last_grid_and_enlarges_small_images(tmp_path):
    from flowers_ddpm.publish.report import evenly_spaced, write_report

    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    (out / "pipeline" / "unet").mkdir(parents=True)
    (out / "pipeline" / "unet" / "config.json").write_text(json.dumps({"sample_size": 16}))
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    for step, colour in zip((100, 200, 300), colours):  # grids of 2 x 2 images of 16 px
        Image.new("RGB", (32, 32), colour).save(out / "samples" / f"step-{step:07d}.png")
    write_report(out)
    row = Image.open(out / "report" / "samples_over_training.png").convert("RGB")
    assert row.size == (3 * 128 + 2 * 4, 128 + 14)  # 3 grids (the last one too), 64 px per image, 4 px apart
    assert [row.getpixel((i * 132 + 64, 80)) for i in range(3)] == colours
    final = Image.open(out / "report" / "final_samples.png").convert("RGB")
    assert final.size == (128, 128) and final.getpixel((100, 100)) == colours[-1]
    assert evenly_spaced(3, 6) == [0, 1, 2] and evenly_spaced(10, 6) == [0, 2, 4, 5, 7, 9]
