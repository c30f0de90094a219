"""Pipeline parallelism at the model level on CPU (gloo): megatron-core's own schedules
(``get_forward_backward_func``: 1F1B at PP=2, interleaved 1F1B at PP=2 x vpp=2) over the stages
``build_gpt_chunks`` builds equal one process: loss, every weight (FoPE coefficients included,
by global layer) and every gradient, with tied and untied embeddings, FoPE and RoPE.

The 4-layer model of the smoke size class (``tiny_config`` with 4 layers), 2 micro-batches of 1.
"""

import re

import pytest
import torch

from fope_megatron.testing.distributed import run_distributed
from fope_megatron.testing.models import random_batch, tiny_config

SEQ, VOCAB, LAYERS, MICRO = 32, 258, 4, 2
LAYOUTS = [  # (vpp, untie_embeddings)
    (1, False),
    (1, True),
    (2, False),
    (2, True),
]


def _config(kind, untie, pp=1, vpp=1):
    return tiny_config(
        kind,
        SEQ,
        f"model.num_layers={LAYERS}",
        f"model.untie_embeddings={str(untie).lower()}",
        f"parallel.pp={pp}",
        f"parallel.vpp={vpp}",
    )


def _micro_batches():
    tokens, labels, pos = random_batch(SEQ, VOCAB, batch=MICRO)
    return [(tokens[i : i + 1], labels[i : i + 1], pos[i : i + 1]) for i in range(MICRO)]


LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _global_state(chunks):
    """name -> (value, grad) over this rank's chunks, layers under their global numbers."""
    out = {}
    for chunk in chunks:
        number = [layer.layer_number - 1 for layer in chunk.decoder.layers]  # megatron: 1-based
        grads = {n: p.grad for n, p in chunk.named_parameters()}
        for name, value in chunk.state_dict(keep_vars=True).items():
            if not name.endswith("_extra_state"):
                found = LAYER.match(name)
                key = (
                    name
                    if found is None
                    else f"decoder.layers.{number[int(found[1])]}.{name[found.end() :]}"
                )
                out[key] = (value.detach(), grads.get(name))
    return out


def _reference(kind, untie):
    from fope_megatron.model.builder import build_gpt
    from fope_megatron.parallel import setup

    setup.init_model_parallel()
    model = build_gpt(_config(kind, untie))
    losses = []
    for tokens, labels, pos in _micro_batches():
        loss = model(tokens, pos, None, labels=labels).float().mean() / MICRO
        loss.backward()
        losses.append(loss.detach() * MICRO)
    return torch.stack(losses), _global_state([model])


def _forward_step(data_iterator, model):
    tokens, labels, pos = next(data_iterator)
    output = model(tokens, pos, None, labels=labels)

    def loss_func(per_token):
        loss = per_token.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule divides loss in place

    return output, loss_func


def _pipeline(kind, untie, vpp):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from fope_megatron.model.builder import build_gpt_chunks
    from fope_megatron.parallel import setup
    from fope_megatron.parallel.grads import all_reduce_embedding_grads

    setup.init_model_parallel(pp=2, vpp=vpp)
    chunks = build_gpt_chunks(_config(kind, untie, pp=2, vpp=vpp))
    data = [iter(_micro_batches()) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=data if vpp > 1 else data[0],
        model=chunks if vpp > 1 else chunks[0],
        num_microbatches=MICRO,
        seq_length=SEQ,
        micro_batch_size=1,
    )
    reduced = all_reduce_embedding_grads(chunks)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    loss = torch.stack([x["loss"] for x in losses]) if last else None
    return loss, _global_state(chunks), reduced


def _job(rank, world, kind):
    out = {}
    for vpp, untie in LAYOUTS:
        ref_loss, ref = _reference(kind, untie)
        loss, got, reduced = _pipeline(kind, untie, vpp)
        # the last stage's copy of a tied embedding is the one-process embedding
        tied = {"output_layer.weight": "embedding.word_embeddings.weight"} if not untie else {}
        diffs = {"loss": None if loss is None else (loss - ref_loss).abs().max().item()}
        diffs.update(weights=0.0, grads=0.0, coefs=0.0)
        for name, (value, grad) in got.items():
            want_value, want_grad = ref[tied.get(name, name)]
            err = (value.float() - want_value.float()).abs().max().item()
            diffs["weights"] = max(diffs["weights"], err)
            if "fope.coef_" in name:  # FoPE's coefficients of this global layer
                diffs["coefs"] = max(diffs["coefs"], err)
            if want_grad is not None or grad is not None:
                diffs["grads"] = max(diffs["grads"], (grad - want_grad).abs().max().item())
        out[(vpp, untie)] = dict(
            diffs,
            reduced=reduced,
            names={tied.get(n, n) for n in got},
            ref_names=set(ref),
            layers=sorted({int(m[1]) for n in got if (m := LAYER.match(n))}),
            coef_names=sorted(n for n in got if "fope.coef_" in n),
        )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fope", "rope"])
def test_pp2_and_interleaved_vpp2_equal_one_process(kind):
    results = run_distributed(_job, 2, kind)
    for layout in LAYOUTS:  # the stages together hold every tensor of the one-process model
        assert (
            set().union(*(res[layout]["names"] for res in results))
            == results[0][layout]["ref_names"]
        ), layout
    for rank, res in enumerate(results):
        for (vpp, untie), r in res.items():
            where = (kind, rank, vpp, untie, {k: v for k, v in r.items() if "names" not in k})
            assert r["weights"] == 0.0 and r["coefs"] == 0.0, where  # drawn, not computed
            assert r["grads"] < 1e-5, where
            assert r["reduced"] is not untie, where  # tied: summed between the two stages
            if rank == 1:  # the last stage holds the loss
                assert r["loss"] < 1e-5, where
            # stage r holds global layers [2r, 2r + 2) (vpp=1) or {r, r + 2} (vpp=2)
            want = [2 * rank, 2 * rank + 1] if vpp == 1 else [rank, rank + 2]
            assert r["layers"] == want, where
            if kind == "fope":  # cos and sin of each of its two layers
                assert len(r["coef_names"]) == 4, where
