"""Two small real phases used to test the pipeline itself (never listed in the product's phases).

``alpha`` builds and saves a tiny real LlamaForCausalLM; ``beta`` loads alpha's model from the registry,
nudges its weights and saves it. Both really write, register and hand over models like product phases.
"""
from forgelib.phases import PhaseSpec

SPECS = {
    "alpha": PhaseSpec(1, "alpha", "pipeline_phases.alpha", "tests/notebooks/alpha.ipynb", "test phase alpha"),
    "beta": PhaseSpec(2, "beta", "pipeline_phases.beta", "tests/notebooks/beta.ipynb", "test phase beta"),
}
ALL = list(SPECS.values())
