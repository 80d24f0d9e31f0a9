"""Training, evaluation and calibration of the chest X-ray models, plus a synthetic CheXpert-like dataset.

Run ``python -m train --help`` for the command line. Submodules are imported on demand, so importing this
package (or running a light subcommand such as ``synth``) never pulls in torch.
"""
