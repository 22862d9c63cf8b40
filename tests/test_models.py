"""Models named by Hub id or bucket URI (pipeline/core/models.py).

The Hub: a cache laid out as ``huggingface_hub`` lays it out (helpers.hub_cache), read in
offline mode, as a cluster without internet reads a pre-filled ``HF_HOME``. The bucket:
the tests' S3-compatible server (conftest.s3_bucket). No network is used.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import hub_cache, tiny_config
from pipeline import runner
from pipeline.core import model_buckets, models
from pipeline.core.config import ConfigError
from pipeline.core.storage import Loc

REPO = "dpo-pipeline/tiny"


@pytest.fixture
def hub(assets, tmp_path, monkeypatch):
    """A Hub cache holding the demo model as REPO (refs main), and a second commit with other
    weights (refs v2); huggingface_hub pointed at it, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    main = hub_cache(cache, REPO, assets["model"])
    other = tmp_path / "other-weights"
    shutil.copytree(assets["model"], other)
    from pipeline.demo import build_model

    tokenizer_len = json.loads((assets["model"] / "config.json").read_text())["vocab_size"]
    build_model(tokenizer_len, seed=1).save_pretrained(other, safe_serialization=True)
    v2 = hub_cache(cache, REPO, other, refs=("v2",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return {"cache": cache, "main": main, "v2": v2}


def fingerprints(cfg) -> dict[str, str]:
    return {name: plan.fingerprint for name, plan in runner.plan_stages(models.pin(cfg)[0]).items()}


def test_the_hub_cache_is_the_layout_huggingface_hub_reads(hub):
    from huggingface_hub import scan_cache_dir

    report = scan_cache_dir(hub["cache"])
    assert report.warnings == []
    (repo,) = report.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    assert {r.commit_hash: r.refs for r in repo.revisions} == {hub["main"]: {"main"}, hub["v2"]: {"v2"}}


def test_a_hub_id_is_pinned_to_its_commit_and_hashed_by_content(assets, hub, tmp_path):
    cfg = tiny_config(assets, tmp_path / "run", model={"path": REPO})
    pinned_cfg, pinned = models.pin(cfg)
    assert pinned_cfg.model.path == pinned_cfg.model.reference_path == pinned_cfg.model.tokenizer_path \
        == f"{REPO}@{hub['main']}"
    assert pinned_cfg.model.revision is None  # carried by the pinned names
    assert pinned["path"].record() == {"name": REPO, "kind": "hub", "pinned": f"{REPO}@{hub['main']}",
                                       "revision": "main", "commit": hub["main"]}
    snapshot = models.local_dir(pinned_cfg.model.path, pinned_cfg.model)
    assert snapshot == str(hub["cache"] / f"models--{REPO.replace('/', '--')}" / "snapshots" / hub["main"])
    # the same files as the local directory: the same fingerprints, whatever the name
    assert fingerprints(cfg) == fingerprints(tiny_config(assets, tmp_path / "run"))


def test_another_revision_is_other_weights_and_the_same_tokenizer(assets, hub, tmp_path):
    main = fingerprints(tiny_config(assets, tmp_path / "run", model={"path": REPO}))
    v2 = fingerprints(tiny_config(assets, tmp_path / "run", model={"path": REPO, "revision": "v2"}))
    assert v2["tokenize"] == main["tokenize"]  # the tokenizer files are the same bytes
    assert v2["score"] != main["score"] and v2["train"] != main["train"]
    # org/name@revision says the same; a commit hash is a revision too
    assert fingerprints(tiny_config(assets, tmp_path / "run", model={"path": f"{REPO}@v2"})) == v2
    assert fingerprints(tiny_config(assets, tmp_path / "run", model={"path": f"{REPO}@{hub['v2']}"})) == v2
    # a reference at another revision than the policy's
    mixed = fingerprints(tiny_config(assets, tmp_path / "run", model={"path": REPO, "reference_path": f"{REPO}@v2"}))
    assert mixed["score"] == v2["score"] and mixed["train"] != v2["train"]
    with pytest.raises(ConfigError, match=r"model.path: 'dpo-pipeline/tiny@v2' names revision 'v2' and "
                                          r"model.revision is 'main'; give one of them"):
        models.pin(tiny_config(assets, tmp_path / "run", model={"path": f"{REPO}@v2", "revision": "main"}))


def test_a_missing_id_or_revision_is_refused_before_any_stage(assets, hub, tmp_path):
    cases = {
        "dpo-pipeline/absent": r"model.path: 'dpo-pipeline/absent' at revision 'main': it is not a local directory, "
                               r"and the model is not in the Hub cache .* \(HF_HUB_OFFLINE is set\)",
        f"{REPO}@v9": r"model.path: 'dpo-pipeline/tiny' at revision 'v9': the revision is not in the Hub cache "
                      r"\(cached revisions: main, v2\)",
        "not a hub id": r"model.path: 'not a hub id' is not a local directory, a URI or a Hub model id",
    }
    for name, message in cases.items():
        run_dir = tmp_path / "run"
        with pytest.raises(ConfigError, match=message):
            runner.run_pipeline(tiny_config(assets, run_dir, model={"path": name}), use_ray=False)
        assert not run_dir.exists()  # refused before anything was written
    with pytest.raises(ConfigError, match=r"model.reference_path: 'dpo-pipeline/absent' at revision 'main'"):
        runner.status(tiny_config(assets, tmp_path / "run", model={"reference_path": "dpo-pipeline/absent"}))


def test_a_cache_without_the_weights_is_refused_on_the_driver(assets, hub, tmp_path):
    from huggingface_hub import constants

    tokenizer_only = tmp_path / "tokenizer-only"
    tokenizer_only.mkdir()
    for f in assets["model"].iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, tokenizer_only / f.name)
    hub_cache(Path(constants.HF_HUB_CACHE), "dpo-pipeline/tokenizer-only", tokenizer_only)
    with pytest.raises(ConfigError, match=r"model.path: 'dpo-pipeline/tokenizer-only' at revision 'main': .* does not "
                                          r"hold config.json and the weights \(found: chat_template.jinja, "):
        models.pin(tiny_config(assets, tmp_path / "run", model={"path": "dpo-pipeline/tokenizer-only"}))
    # as a tokenizer it is fine, and hashes as the model directory's tokenizer does
    cfg = tiny_config(assets, tmp_path / "run", model={"tokenizer_path": "dpo-pipeline/tokenizer-only"})
    assert fingerprints(cfg) == fingerprints(tiny_config(assets, tmp_path / "run"))


def test_settings_that_cannot_apply_are_refused(assets, hub, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"model.revision: 'v2' is for a Hub id, and model.path '.*' is a local "
                                          r"directory"):
        models.pin(tiny_config(assets, tmp_path / "run", model={"revision": "v2"}))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"cluster.runtime_env.env_vars.HF_TOKEN: set for the workers only, but the "
                                          r"driver resolves the Hub ids"):
        models.pin(tiny_config(assets, tmp_path / "run", model={"path": REPO},
                               cluster={"runtime_env": {"env_vars": {"HF_TOKEN": "hf_x"}}}))
    # a reference-free loss loads no reference: an unresolvable one is not looked up
    cfg, pinned = models.pin(tiny_config(assets, tmp_path / "run", model={"reference_path": "dpo-pipeline/absent"},
                                         train={"loss_type": "simpo"}))
    assert sorted(pinned) == ["path", "tokenizer_path"] and cfg.model.reference_path == "dpo-pipeline/absent"


@pytest.mark.parametrize("error, message", [
    ("RepositoryNotFoundError", r"no such model on the Hub, or it is private or gated and HF_TOKEN does not grant it "
                                r"\(no local directory .*/org/model\)"),
    ("RevisionNotFoundError", r"at revision 'main': the revision does not exist"),
    ("ConnectError", r"the Hub could not be reached \(no local directory .*\) \(ConnectError: "),
])
def test_online_hub_errors_name_the_key(assets, tmp_path, monkeypatch, error, message):
    """Online the Hub answers; huggingface_hub turns its answers into these exceptions (the
    Hub itself cannot be reached from the tests, so snapshot_download raises them here)."""
    import httpx
    import huggingface_hub
    from huggingface_hub import errors

    def refuse(repo_id, **kwargs):
        if error == "ConnectError":
            raise httpx.ConnectError("[Errno 111] Connection refused")
        response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
        raise getattr(errors, error)(f"{error}: {repo_id}", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"model.path: 'org/model'.*{message}"):
        models.pin(tiny_config(assets, tmp_path / "run", model={"path": "org/model"}))


def test_the_weights_hashed_are_the_ones_transformers_loads(assets, tmp_path):
    """A Mistral-style repository: sharded safetensors with their index, plus a second copy
    (consolidated.safetensors) and .bin weights that transformers does not load."""
    from transformers import AutoModelForCausalLM

    from pipeline.core.rundir import model_weight_files

    sharded = tmp_path / "sharded"
    shutil.copytree(assets["model"], sharded)
    (sharded / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(assets["model"]).save_pretrained(sharded, max_shard_size="100KB")
    names = [f.name for f in model_weight_files(sharded)]
    assert names[0] == "model.safetensors.index.json" and len(names) > 2
    before = fingerprints(tiny_config(assets, tmp_path / "run", model={"path": str(sharded)}))
    shutil.copy(sharded / names[1], sharded / "consolidated.safetensors")
    (sharded / "pytorch_model.bin").write_bytes(b"unused")
    assert [f.name for f in model_weight_files(sharded)] == names
    assert fingerprints(tiny_config(assets, tmp_path / "run", model={"path": str(sharded)})) == before


def test_a_local_directory_of_that_name_wins(assets, hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(assets["model"], tmp_path / REPO)
    cfg, pinned = models.pin(tiny_config(assets, tmp_path / "run", model={"path": REPO}))
    assert pinned["path"].kind == "local" and cfg.model.path == str(tmp_path / REPO)


# ----------------------------------------------------------------------------- buckets


def upload_model(assets, uri: str) -> None:
    for f in sorted(assets["model"].iterdir()):
        Loc(f"{uri}/{f.name}").upload(f)


def test_a_bucket_model_is_downloaded_once_per_cache_and_checked(assets, s3_bucket, tmp_path, monkeypatch):
    uri = f"{s3_bucket}/models/{tmp_path.name}/tiny"
    upload_model(assets, uri)
    monkeypatch.setenv("NODE_LOCAL", str(tmp_path / "node-a"))
    cfg = tiny_config(assets, tmp_path / "run", model={"path": uri, "cache_dir": "$NODE_LOCAL/models"})
    pinned_cfg, pinned = models.pin(cfg)
    digest = pinned["path"].digest
    assert pinned_cfg.model.path == f"{uri}#sha256={digest}" and pinned["path"].kind == "uri"
    # the same files: the same fingerprints as the local directory
    assert fingerprints(cfg) == fingerprints(tiny_config(assets, tmp_path / "run"))
    (copy_a,) = (tmp_path / "node-a" / "models").glob("*-tiny")
    marker = json.loads((copy_a / model_buckets.MARKER).read_text())
    assert sorted(marker["files"]) == sorted(f.name for f in assets["model"].iterdir())
    for name, entry in marker["files"].items():
        assert (copy_a / name).read_bytes() == (assets["model"] / name).read_bytes()
        assert entry["sha256"] == __import__("hashlib").sha256((assets["model"] / name).read_bytes()).hexdigest()

    # another node (another cache): one download, then the copy is reused as it is
    monkeypatch.setenv("NODE_LOCAL", str(tmp_path / "node-b"))
    first = models.local_dir(pinned_cfg.model.path, pinned_cfg.model)
    stamp = os.stat(Path(first) / model_buckets.MARKER).st_mtime_ns
    assert models.local_dir(pinned_cfg.model.path, pinned_cfg.model) == first
    assert os.stat(Path(first) / model_buckets.MARKER).st_mtime_ns == stamp
    assert Path(first).parent == tmp_path / "node-b" / "models"

    # the bucket changed after the driver pinned it: refused, not trained on
    Loc(f"{uri}/config.json").write_text((assets["model"] / "config.json").read_text() + "\n")
    monkeypatch.setenv("NODE_LOCAL", str(tmp_path / "node-c"))
    with pytest.raises(RuntimeError, match=rf"tiny: its files changed after the driver hashed them .* pinned {digest}"):
        models.local_dir(pinned_cfg.model.path, pinned_cfg.model)
    # a new run pins the new files (the changed config.json changes the policy's hash)
    assert models.pin(cfg)[1]["path"].digest != digest

    # a digest written in the config is checked, not replaced
    with pytest.raises(RuntimeError, match=r"its files changed after the driver hashed them .* pinned 0000000000000000"):
        models.pin(tiny_config(assets, tmp_path / "run", model={"path": f"{uri}#sha256=0000000000000000",
                                                              "cache_dir": str(tmp_path / "node-d")}))
    monkeypatch.delenv("NODE_LOCAL")
    with pytest.raises(ConfigError, match=r"model.cache_dir: '\$NODE_LOCAL/models': an environment variable"):
        models.local_dir(pinned_cfg.model.path, pinned_cfg.model)
    with pytest.raises(ConfigError, match=r"model.path: s3://pipeline-test/nothing-here: no config.json or tokenizer"):
        models.pin(tiny_config(assets, tmp_path / "run", model={"path": f"{s3_bucket}/nothing-here",
                                                              "cache_dir": str(tmp_path / "c")}))


@pytest.mark.slow
def test_two_workers_with_their_own_caches_download_the_model_once_each(assets, s3_bucket, ray_cluster, tmp_path):
    import ray

    uri = f"{s3_bucket}/models/{tmp_path.name}/tiny"
    upload_model(assets, uri)
    cfg = tiny_config(assets, tmp_path / "run", model={"path": uri, "cache_dir": "$NODE_LOCAL/models",
                                                       "dtype": "float32"})
    os.environ["NODE_LOCAL"] = str(tmp_path / "driver")
    try:
        pinned_cfg, _ = models.pin(cfg)
    finally:
        del os.environ["NODE_LOCAL"]

    @ray.remote(num_cpus=0)
    def load_twice(model_cfg):
        from pipeline.core.modeling import load_causal_lm

        out = []
        for _ in range(2):
            path = Path(models.local_dir(model_cfg.path, model_cfg))
            model = load_causal_lm(model_cfg.path, model_cfg)  # the copy, loaded as score/train load it
            out.append((str(path), json.loads((path / model_buckets.MARKER).read_text())["downloaded_at"],
                        float(sum(p.double().sum() for p in model.parameters()))))
        return out

    # two "nodes" (caches), the first with two processes loading side by side
    caches = [tmp_path / "node-0", tmp_path / "node-0", tmp_path / "node-1"]
    results = ray.get([load_twice.options(runtime_env={"env_vars": {"NODE_LOCAL": str(c)}}).remote(pinned_cfg.model)
                       for c in caches])
    from transformers import AutoModelForCausalLM

    want = float(sum(p.double().sum() for p in AutoModelForCausalLM.from_pretrained(assets["model"]).parameters()))
    for cache, runs in zip(caches, results):
        (copy,) = (cache / "models").glob("*-tiny")
        assert [r[0] for r in runs] == [str(copy)] * 2
        assert runs[0][1] == runs[1][1]  # downloaded once: the second load found the copy
        assert runs[0][2] == runs[1][2] == want
    # one download per node: the two processes of node-0 used the same copy (the lock)
    assert results[0][0][1] == results[1][0][1] != results[2][0][1]
    assert not list((tmp_path / "node-0" / "models").glob("*.tmp-*"))


# ----------------------------------------------------------------------------- paths


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED_MODELS = {"qwen2.5-1.5b-1node.yaml": "/mnt/shared/models/Qwen2.5-1.5B-Instruct",
                  "llama3.1-8b-multinode.yaml": "/mnt/shared/models/Meta-Llama-3.1-8B-Instruct"}


@pytest.mark.parametrize("name", sorted(SHIPPED_MODELS))
def test_a_shipped_config_names_its_model_directory_and_runs_once_adapted(name, assets, tmp_path, capsys):
    """A path that is not a directory here was taken for a Hub id, and the shipped GPU
    configs stopped on their Hub settings (cluster.runtime_env HF_HUB_OFFLINE). As shipped,
    `status` names the directory to adapt; with the ADAPT paths on this machine, it passes."""
    from pipeline import cli

    assert cli.main(["status", str(CONFIGS / name)]) == 2
    assert capsys.readouterr().err == (f"error: model.path: {SHIPPED_MODELS[name]}: no such directory (a name starting "
                                       f"with /, ./, ../, ~ is a local path, not a Hub id)\n")
    adapted = [f"run_dir={tmp_path / 'run'}", f"model.path={assets['model']}", f"data.train_files=[{assets['data']}]"]
    assert cli.main(["status", str(CONFIGS / name), *adapted]) == 0
    table = capsys.readouterr().out
    assert [line.split()[:3:2] for line in table.splitlines()[1:]] == [
        ["tokenize", "missing"], ["sft", "not"], ["score", "missing"], ["train", "missing"], ["generate", "not"]], table


@pytest.mark.parametrize("written", ["./no-model", "../no-model", "~/no-such-model-dir", "/no/such/model"])
def test_a_path_that_is_no_directory_is_never_a_hub_id(assets, hub, tmp_path, written):
    with pytest.raises(ConfigError, match=rf"model.tokenizer_path: {written}: no such directory"):
        models.pin(tiny_config(assets, tmp_path / "run", model={"tokenizer_path": written}))
    assert models.kind_of("org/name") == "hub" and models.kind_of(str(assets["model"])) == "local"
    # a node that does not see the driver's directory says so, naming itself
    with pytest.raises(FileNotFoundError, match=rf"model: {written}: no such directory on \S+; every node must see it"):
        models.local_dir(written, tiny_config(assets, tmp_path / "run").model)
