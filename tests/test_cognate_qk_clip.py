"""QK-clip on the Cognate model itself (recursion and memory on): the model reports its per-head max logits
natively, and one optimizer step brings every head to <= tau while untouched groups keep their weights."""
import torch

from forgelib.models import CognateConfig, CognateForCausalLM
from forgelib.optim import MuGrokfastConfig, MuonGrokfast


def _model():
    torch.manual_seed(0)
    return CognateForCausalLM(CognateConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, n_latent=1, n_cycles=2,
                                            use_memory=True, memory_chunk_size=4))


def test_qk_clip_bounds_every_head_of_a_recursive_cognate_model():
    model = _model()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight[0:8] *= 40.0  # drive head 0 (key group 0) to large logits
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    before = attn.qk_max_logits.clone()
    others = max(before[1:].max().item(), model.model.layers[1].self_attn.qk_max_logits.max().item())
    tau = 0.5 * before[0].item()
    assert tau > others, "precondition: only the driven head exceeds tau"
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MuonGrokfast.from_model(model, MuGrokfastConfig(lr=0.0, grokfast_lambda=0.0, qk_clip_tau=tau))
    opt.step()
    assert [r["head"] for r in opt.last_qk_clip] == [0]
    with torch.no_grad():
        model(input_ids=ids)
    after = attn.qk_max_logits
    assert after.max() <= tau * (1 + 1e-3)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, weights[n])}
    assert changed == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"}
    assert torch.equal(attn.k_proj.weight[8:], weights["model.layers.0.self_attn.k_proj.weight"][8:])
    # (Their logits may still move a little: with recursion, later calls of the block see inputs that the
    # clipped head changed. Their weights, checked above, are untouched.)
