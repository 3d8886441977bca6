"""megacpt's own model as an lm-evaluation-harness `LM`: task accuracy without an export round trip.

`MegacptLM` answers lm-eval's three request types with any callable `forward(input_ids,
segment_ids=None) -> logits (b, s, V)`: a one-process model (`megacpt eval --tasks`) or a
DeepSpeed engine during training. It tokenizes exactly as lm-eval's `hf` backend does
(`TemplateLM._encode_pair`, BOS only where the tokenizer adds it, contexts left-truncated to
the model's length), so its scores equal `simple_evaluate(model="hf", ...)` on the exported
directory item for item.

In training every rank builds the same request list; `Spread` gives each data-parallel rank
every dp_size-th request of the length-sorted list, and the results are gathered so every rank
returns all of them. All ranks make the same number of forward calls (ZeRO-3 gathers parameters
collectively; the ranks of a tensor-parallel group share each forward), padding with dummy calls
when they run out of requests. Generation is greedy (what `hf` does with `do_sample: false`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megacpt.errors import UserError


@dataclass
class Spread:
    """How the requests are shared over ranks (one process: the defaults)."""

    dp_rank: int = 0
    dp_size: int = 1
    dp_group: object = None
    distributed: bool = False
    # Sequence parallelism scatters positions over the tensor group: lengths must divide by it.
    seq_multiple: int = 1

    def mine(self, order: list[int]) -> list[int]:
        return order[self.dp_rank::self.dp_size]

    def calls(self, n: int, batch: int) -> int:
        """Forward batches every rank runs for n requests (the busiest rank's count)."""
        return -(-(-(-n // self.dp_size)) // batch)

    def gather(self, part: dict) -> dict:
        if not self.distributed:
            return part
        every = [None] * self.dp_size
        dist.all_gather_object(every, part, group=self.dp_group)
        return {k: v for d in every for k, v in d.items()}

    def all_done(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)  # the whole world: tp ranks share each forward
        return bool(t.item())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class MegacptLM(TemplateLM):
    """lm-eval `LM` over a megacpt forward callable (see the module docstring)."""

    def __init__(self, forward, tokenizer, max_length: int, *, batch_size: int = 8, spread: Spread | None = None,
                 device="cpu", eos_ids=()):
        super().__init__()
        self.forward, self.tokenizer, self._max_length = forward, tokenizer, max_length
        self._batch_size, self.spread, self._device = batch_size, spread or Spread(), torch.device(device)
        self.eos_ids = {int(i) for i in eos_ids} | {tokenizer.eos_token_id}

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "megacpt").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- scoring -------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        items = []
        for _, context, continuation in requests:
            inp = (context + continuation)[-(self.max_length + 1):][:-1]  # left-truncated like `hf`
            items.append((inp, continuation))
        return self.score(items)

    def score(self, items: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, greedy?) of each continuation, whose tokens are the last
        len(continuation) targets of its input (targets = input shifted left by one)."""
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        mine, bs, part = self.spread.mine(order), self._batch_size, {}
        for c in range(self.spread.calls(len(items), bs)):
            chunk = mine[c * bs:(c + 1) * bs]
            rows = [items[i][0] for i in chunk] or [[self.prefix_token_id]]  # a rank out of work still calls
            width = _round_up(max(len(r) for r in rows), self.spread.seq_multiple)
            ids = torch.zeros(len(rows), width, dtype=torch.int64)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = torch.tensor(r, dtype=torch.int64)  # right padding: causal, so harmless
            with torch.no_grad():
                logits = self.forward(ids.to(self._device))
            for j, i in enumerate(chunk):
                inp, cont = items[i]
                pos = logits[j, len(inp) - len(cont):len(inp)].float()
                target = torch.tensor(cont, dtype=torch.int64, device=pos.device)
                logp = torch.log_softmax(pos, dim=-1).gather(-1, target[:, None]).sum()
                part[i] = (float(logp), bool((pos.argmax(-1) == target).all()))
        found = self.spread.gather(part)
        return [found[i] for i in range(len(items))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            rolling = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, rolling):
                windows.append(((context + continuation)[:-1], continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self.score(windows)):
            totals[n] += logp
        return totals

    # ---- generation ----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise UserError(f"task {requests[idx[0]].task_name}: asks for sampled generation (do_sample: true); "
                                f"megacpt evaluates with greedy decoding only: set do_sample: false")
            eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise UserError(f"max_gen_toks {max_new} leaves no room for a prompt in {self.max_length} positions")
            prompts = [self._encode_prompt(requests[i].args[0])[-(self.max_length - max_new):] for i in idx]
            for i, text in zip(idx, self.generate(prompts, max_new, until)):
                out[i] = text
        return out

    def _encode_prompt(self, text: str) -> list[int]:
        """As `hf`'s tok_batch_encode: the tokenizer's own special tokens unless BOS is written."""
        if has_bos_prefix(text, getattr(self.tokenizer, "bos_token", None)):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def generate(self, prompts: list[list[int]], max_new: int, until: list[str]) -> list[str]:
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        mine, bs, part = self.spread.mine(order), self._batch_size, {}
        for c in range(self.spread.calls(len(prompts), bs)):
            chunk = mine[c * bs:(c + 1) * bs]
            gens = self._greedy([prompts[i] for i in chunk] or [[self.prefix_token_id]], max_new, until,
                                dummy=not chunk)
            for i, g in zip(chunk, gens):
                part[i] = postprocess_generated_text(self.tok_decode(g), until, None)
        found = self.spread.gather(part)
        return [found[i] for i in range(len(prompts))]

    def _greedy(self, prompts: list[list[int]], max_new: int, until: list[str], dummy: bool) -> list[list[int]]:
        """Greedy continuations, each ended by an EOS token or a stop string (the whole batch goes
        on until every row, on every rank, has ended: the ranks share the forward calls).

        Prompts are left-padded; the padding is a segment of its own, so document masking keeps it
        out of attention and positions start at 0 at each prompt's first token, as when run alone.
        """
        gens = [[] for _ in prompts]
        done = [dummy] * len(prompts)
        for _ in range(max_new):
            rows = [p + g for p, g in zip(prompts, gens)]
            width = _round_up(max(len(r) for r in rows), self.spread.seq_multiple)
            ids = torch.zeros(len(rows), width, dtype=torch.int64)
            seg = torch.zeros(len(rows), width, dtype=torch.int64)
            for j, r in enumerate(rows):
                ids[j, width - len(r):] = torch.tensor(r, dtype=torch.int64)
                seg[j, width - len(r):] = 1
            with torch.no_grad():
                logits = self.forward(ids.to(self._device), segment_ids=seg.to(self._device))
            nxt = logits[:, -1].float().argmax(-1).tolist()
            for j, tok in enumerate(nxt):
                if not done[j]:
                    gens[j].append(tok)
                    # Special tokens kept: a stop string may be one (`<|im_end|>`), as in lm-eval's check.
                    text = self.tok_decode(gens[j], skip_special_tokens=False)
                    done[j] = tok in self.eos_ids or any(s and s in text for s in until)
            if self.spread.all_done(all(done)):
                break
        return gens
