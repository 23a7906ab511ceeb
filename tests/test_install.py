"""A non-editable install runs without the source tree: the wheel carries the package, the shipped configs,
and every stage launches by module (``accelerate launch -m rlhf <stage>``)."""

import subprocess
import sys
import sysconfig
import zipfile

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding only the built wheel; third-party packages come from this venv's site-packages by
    a plain path entry (so the editable install's import hook does not come along)."""
    root = tmp_path_factory.mktemp("install")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(root / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("rlhf_pipeline-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                           "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv, wheel, root


def run(venv, *args, cwd, timeout=600):
    return subprocess.run([str(venv / "bin" / "python"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def test_the_wheel_ships_the_configs_and_no_tests(installed):
    _, wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("rlhf/configs/demo/pipeline.yaml", "rlhf/configs/demo/ppo.yaml", "rlhf/configs/accelerate/cpu.yaml",
                    "rlhf/configs/recipes/qwen2.5-0.5b-hh/pipeline.yaml", "rlhf/py.typed", "reward_models/api.py"):
        assert shipped in names, shipped
    assert not [n for n in names if n.startswith(("tests/", "scripts/"))]


def test_installed_package_runs_the_pipeline_dry_run_and_a_stage_outside_the_checkout(installed, tmp_path):
    venv, _, _ = installed
    where = run(venv, "-c", "import rlhf, reward_models; print(rlhf.__file__, reward_models.__file__)", cwd=tmp_path)
    assert str(venv) in where.stdout and str(REPO) not in where.stdout, where.stdout + where.stderr
    dry = run(venv, "-m", "rlhf", "pipeline", "--config", "demo/pipeline.yaml", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert "dry run: 0 problem(s)" in dry.stdout and str(REPO) not in dry.stdout
    out = tmp_path / "ppo"
    stage = run(venv, "-m", "accelerate.commands.launch", "--num_processes", "1", "-m", "rlhf", "ppo",
                "--config", "demo/ppo.yaml", f"output_dir={out}", "model_name_or_path=tiny:demo", "reward_model=null",
                "reward_function=gold", "batch_size=4", "max_new_tokens=6", "ppo_epochs=1", "max_steps=1",
                "eval_prompts=4", "report_to=none", cwd=tmp_path)
    assert stage.returncode == 0, stage.stdout[-3000:] + stage.stderr[-3000:]
    assert (out / "ppo_summary.json").exists() and (out / "critic" / "config.json").exists()
