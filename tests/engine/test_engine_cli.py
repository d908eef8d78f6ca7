"""The engine's CLI: make-tiny-model, generate --json, check-context exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from dgserve.cli import main


def test_console_script_is_installed():
    exe = shutil.which("dgserve") or str(Path(sys.executable).parent / "dgserve")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "generate" in out.stdout and "check-context" in out.stdout


def test_make_tiny_model_then_generate_json(tmp_path, capsys):
    d = tmp_path / "m"
    assert main(["make-tiny-model", str(d)]) == 0
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in d.iterdir()}
    capsys.readouterr()
    assert main(["generate", "--model", str(d), "--prompt", "hello", "--max-new-tokens", "40", "--seed", "1",
                 "--steps", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 40 or out["finish_reason"] == "stop"
    stats = out["stats"]
    assert stats["canvases"] == 2 and stats["steps_per_canvas"] == [4, 4] or out["finish_reason"] == "stop"
    assert {"seconds", "tokens_per_step", "time_to_first_canvas"} <= set(stats)


def test_generate_reports_bad_input(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--max-new-tokens", "0"]) == 1
    assert "max_new_tokens must be positive" in capsys.readouterr().err


def test_check_context_exit_codes(tiny_dir, capsys):
    assert main(["check-context", "--model", str(tiny_dir), "--context", "4096", "--device", "cpu"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["check-context", "--model", str(tiny_dir), "--context", "262144", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "262144" in err and "4096" in err and "max_position_embeddings" in err


def test_tokenizer_can_leave_out_bos(engine):
    with_bos = engine.tokenizer.encode("abc")
    assert with_bos[0] == 2 and engine.tokenizer.encode("abc", add_special_tokens=False) == with_bos[1:]
    assert engine.info().default_max_new_tokens == 256 and engine.info().default_max_denoising_steps == 16


def test_engine_config_overrides_the_checkpoint_sampler_defaults(tiny_dir):
    from dgserve.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

    eng = Engine(EngineConfig(model=str(tiny_dir), max_batch=1, context_length=256, max_denoising_steps=3,
                              confidence_threshold=0.0, entropy_bound=0.5), progress=False)
    assert (eng.defaults.max_denoising_steps, eng.defaults.entropy_bound, eng.defaults.confidence_threshold) == (
        3, 0.5, 0.0)
    res = eng.generate_batch([GenerationRequest("d", (2, 3), SamplingParams(max_new_tokens=40))])[0]
    assert set(res.stats.steps_per_canvas) == {3} and eng.info().default_max_denoising_steps == 3


def test_bench_refuses_a_thread_count_below_one(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["bench", "engine", "--threads", "0"])
    assert e.value.code == 2 and "--threads: must be at least 1, got 0" in capsys.readouterr().err


def test_bench_gpu_invariance_check_on_cpu(tmp_path):
    """The GPU script's batch-invariance mode, run on the CPU with a tiny config: there the engine is
    batch-invariant, so all eight requests must match their solo runs (on an H200 they do not:
    docs/benchmarks.md)."""
    import json

    from dgserve.engine import bench_gpu

    out = tmp_path / "inv.json"
    assert bench_gpu.main(["--shapes", "tiny", "--device", "cpu", "--invariance", "--layers", "2", "--prompt", "24",
                           "--new-tokens", "40", "--steps", "3", "--dir", str(tmp_path), "--out", str(out)]) == 0
    report = json.loads(out.read_text())["batch_invariance"]
    for name in ("alone_vs_alone_again", "alone_vs_full_batch", "alone_vs_joined_mid_canvas"):
        assert report[name]["identical"] == report[name]["of"] > 0, (name, report[name])


def test_bench_gpu_compare_outputs_names_the_first_difference():
    from dgserve.engine.bench_gpu import compare_outputs

    want = {"a": (1, 2, 3), "b": (4, 5, 6), "c": (7, 8)}
    got = {"a": (1, 2, 3), "b": (4, 9, 6), "c": (7, 8, 0)}
    assert compare_outputs(want, got) == {"identical": 1, "of": 3, "first_differing_position": {"b": 1, "c": 2}}
