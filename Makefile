# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
.PHONY: demo test test-fresh test-slurm venv

venv:
	@bash scripts/venv.sh

demo:
	@V=$$(bash scripts/venv.sh) && "$$V/bin/python" -m nnunetv2_cam_core.demo -o demo_output

test:
	@V=$$(bash scripts/venv.sh) && bash scripts/qt_libs.sh "$$V" && "$$V/bin/python" -m pytest -q -rs Testing

# the suite as on a new machine: tiny models trained anew into an empty temporary cache (the venv is reused);
# NNUNETCAM_TINY_SEED=N trains other models from other data
test-fresh:
	@V=$$(bash scripts/venv.sh) && bash scripts/qt_libs.sh "$$V" && T=$$(mktemp -d) && trap 'rm -rf "$$T"' EXIT && \
		NNUNETCAM_MODEL_CACHE="$$T" "$$V/bin/python" -m pytest -q -rs Testing

# the cohort split on a real SLURM: Debian's slurm-wlm and munge (installed if missing; root), one node on localhost
test-slurm:
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge; }
	@V=$$(bash scripts/venv.sh) && NNUNETCAM_SLURM=1 "$$V/bin/python" -m pytest -q -rs Testing/test_slurm.py
