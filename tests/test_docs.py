"""The Sphinx docs build with warnings as errors and cover the public API."""

import os
import re
import subprocess
import sys

import pytest

import ntk_diag as nd

pytest.importorskip("sphinx")
pytest.importorskip("myst_parser")

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


@pytest.fixture(scope="module")
def html(tmp_path_factory):
  out = tmp_path_factory.mktemp("html")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q",
       "-b", "html", "-d", str(out / ".doctrees"), DOCS, str(out)],
      capture_output=True, text=True, env=env, check=False,
  )
  assert result.returncode == 0, f"sphinx -W failed:\n{result.stderr}"
  return out


def test_pages_built(html):
  for page in ("index", "quickstart", "metrics", "theory", "api"):
    assert (html / f"{page}.html").exists(), page


def test_api_reference_documents_every_public_name(html):
  text = (html / "api.html").read_text(encoding="utf-8")
  documented = set(re.findall(r'<dt class="sig sig-object py" id="([^"]+)"', text))
  documented = {name.rsplit(".", 1)[-1] for name in documented}
  missing = sorted(set(nd.__all__) - documented)
  assert not missing, f"not in docs/api.md: {missing}"
  assert "load_numpy" in documented


def test_metrics_page_lists_every_hook_tag(html):
  text = (html / "metrics.html").read_text(encoding="utf-8")
  tags = ("kappa", "jacobian_norm", "hessian_norm", "residual_norm",
          "kernel_drift", "kernel_distance", "kernel_alignment",
          "weight_change", "twin_gap")
  missing = [tag for tag in tags if f"ntk_diag/{tag}" not in text]
  assert not missing, missing
