# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
.PHONY: demo test test-fresh venv

venv:
	@bash scripts/venv.sh

demo:
	@V=$$(bash scripts/venv.sh) && "$$V/bin/python" -m nnunetv2_cam_core.demo -o demo_output

test:
	@V=$$(bash scripts/venv.sh) && "$$V/bin/python" -m pytest -q -rs Testing

# the suite as on a new machine: tiny models trained anew into an empty temporary cache (the venv is reused);
# NNUNETCAM_TINY_SEED=N trains other models from other data
test-fresh:
	@V=$$(bash scripts/venv.sh) && T=$$(mktemp -d) && trap 'rm -rf "$$T"' EXIT && \
		NNUNETCAM_MODEL_CACHE="$$T" "$$V/bin/python" -m pytest -q -rs Testing
