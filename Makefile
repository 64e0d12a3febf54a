# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
.PHONY: demo test venv

venv:
	@bash scripts/venv.sh

demo:
	@V=$$(bash scripts/venv.sh) && "$$V/bin/python" -m nnunetv2_cam_core.demo -o demo_output

test:
	@V=$$(bash scripts/venv.sh) && "$$V/bin/python" -m pytest -q -rs Testing
