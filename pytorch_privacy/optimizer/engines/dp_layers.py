"""Layers rewritten over ``nn.Linear`` so that every engine handles them: drop-ins for
``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` (explicit cells) and ``nn.MultiheadAttention``
(:class:`DPMultiheadAttention`, separate projections).

``torch.func.vmap`` has no batching rule for the fused ``nn.RNN``/``nn.GRU`` kernels (torch 2.13),
so models with those fall back to the slow loop engine.  :class:`DPRNN`, :class:`DPGRU` and
:class:`DPLSTM` compute the same functions (same equations, gate order and initialisation as
torch) from ``nn.Linear`` maps: they vmap, and the ghost engine supports them (the input map is
one ``nn.Linear`` call over the whole sequence, the hidden map one call per time step; the engine
sums the calls per parameter).  Opacus provides similar layers (``DPLSTM``); these are written
independently.

Parameter names differ from torch's (``cells.0.ih.weight`` instead of ``weight_ih_l0``); use
:meth:`DPRNNBase.from_torch` / :meth:`DPRNNBase.to_torch_state_dict` to convert.  Every drop-in
*loads* state dicts written under torch's names as well as its own, and with
``torch_state_dict_names = True`` (set by :func:`~.swap.swap_to_dp_layers`) it also *writes* its
``state_dict`` under torch's names, so checkpoints move freely between a native model and its
swapped copy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["DPRNNBase", "DPRNN", "DPGRU", "DPLSTM", "DPRNNCellPair", "DPMultiheadAttention"]


class DPRNNCellPair(nn.Module):
    """The two affine maps of one layer and direction: ``ih`` (input to gates) and ``hh``
    (hidden state to gates), as ``nn.Linear`` modules."""

    def __init__(self, input_size: int, hidden_size: int, gates: int, bias: bool):
        super().__init__()
        self.ih = nn.Linear(input_size, gates * hidden_size, bias=bias)
        self.hh = nn.Linear(hidden_size, gates * hidden_size, bias=bias)


class DPRNNBase(nn.Module):
    """Multi-layer, optionally bidirectional recurrent layer over ``nn.Linear`` cells.

    Arguments and call signature follow ``nn.RNN``/``nn.GRU``/``nn.LSTM``: ``forward(input,
    hx=None)`` with ``input`` ``[T, B, input_size]`` (``[B, T, input_size]`` when
    ``batch_first``) returns ``(output, h_n)`` (LSTM: ``(output, (h_n, c_n))``).  Packed sequences
    and ``proj_size`` are not supported.
    """

    mode: str = ""
    gates: int = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        self.dropout = float(dropout)
        self.num_directions = 2 if bidirectional else 1
        cells = []
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size * self.num_directions
            for _ in range(self.num_directions):
                cells.append(DPRNNCellPair(in_size, hidden_size, self.gates, bias))
        self.cells = nn.ModuleList(cells)
        self.drop = nn.Dropout(self.dropout)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)
        self.reset_parameters()
        self.torch_state_dict_names = False
        _install_name_hooks(self)

    #: torch's attribute (the drop-ins have no projections)
    proj_size = 0

    def flatten_parameters(self) -> None:
        """No-op (torch's cuDNN weight compaction has no counterpart here); lets code written for
        ``nn.LSTM`` call it on a swapped layer."""

    def _name_map(self) -> list[tuple[str, tuple[str, ...]]]:
        """``(torch name, (own names stacked along dim 0))`` for every parameter."""
        out = []
        for idx, (_, suffix) in enumerate(self._torch_names()):
            for kind in ("ih", "hh"):
                out.append((f"weight_{kind}{suffix}", (f"cells.{idx}.{kind}.weight",)))
            if self.bias:
                for kind in ("ih", "hh"):
                    out.append((f"bias_{kind}{suffix}", (f"cells.{idx}.{kind}.bias",)))
        return out

    def reset_parameters(self) -> None:
        """torch's initialisation: every weight and bias ``U(-1/sqrt(H), 1/sqrt(H))``."""
        k = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for p in self.parameters():
            nn.init.uniform_(p, -k, k)

    # -- conversion ---------------------------------------------------------------------
    def _torch_names(self):
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                yield self.cells[layer * self.num_directions + direction], suffix

    def to_torch_state_dict(self) -> dict[str, torch.Tensor]:
        """This layer's parameters under ``nn.RNN/GRU/LSTM`` names (``weight_ih_l0`` ...)."""
        out = {}
        for cell, suffix in self._torch_names():
            out["weight_ih" + suffix] = cell.ih.weight.detach().clone()
            out["weight_hh" + suffix] = cell.hh.weight.detach().clone()
            if self.bias:
                out["bias_ih" + suffix] = cell.ih.bias.detach().clone()
                out["bias_hh" + suffix] = cell.hh.bias.detach().clone()
        return out

    def load_torch_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy parameters given under ``nn.RNN/GRU/LSTM`` names."""
        with torch.no_grad():
            for cell, suffix in self._torch_names():
                cell.ih.weight.copy_(state["weight_ih" + suffix])
                cell.hh.weight.copy_(state["weight_hh" + suffix])
                if self.bias:
                    cell.ih.bias.copy_(state["bias_ih" + suffix])
                    cell.hh.bias.copy_(state["bias_hh" + suffix])

    @classmethod
    def from_torch(cls, module: nn.RNNBase) -> DPRNNBase:
        """A drop-in computing the same function as ``module`` (an ``nn.RNN/GRU/LSTM``)."""
        if getattr(module, "proj_size", 0):
            raise ValueError("proj_size is not supported by the DP recurrent layers")
        kwargs = dict(
            input_size=module.input_size,
            hidden_size=module.hidden_size,
            num_layers=module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
        )
        if cls is DPRNN:
            kwargs["nonlinearity"] = module.nonlinearity
        p = next(module.parameters())
        new = cls(**kwargs, device=p.device, dtype=p.dtype)
        new.load_torch_state_dict(dict(module.named_parameters()))
        return new

    # -- forward ------------------------------------------------------------------------
    def _cell(self, gx: torch.Tensor, h, cell: DPRNNCellPair):
        raise NotImplementedError

    def _init_state(self, batch: int, ref: torch.Tensor):
        return ref.new_zeros(batch, self.hidden_size)

    def forward(self, input: torch.Tensor, hx=None):
        """Run the layer; see the class docstring for shapes."""
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise TypeError("packed sequences are not supported by the DP recurrent layers; pad instead")
        unbatched = input.dim() == 2
        x = input.unsqueeze(1 if not self.batch_first else 0) if unbatched else input
        x = x if self.batch_first else x.transpose(0, 1)  # [B, T, F]: cells see batch-first tensors
        B, T = x.shape[0], x.shape[1]
        states = self._split_hx(hx, B, x, unbatched)
        finals = []
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                idx = layer * self.num_directions + direction
                cell = self.cells[idx]
                gates_x = cell.ih(x)  # one call over the whole sequence: [B, T, G*H]
                h = states[idx]
                steps = range(T - 1, -1, -1) if direction else range(T)
                seq = [None] * T
                for t in steps:
                    h = self._cell(gates_x[:, t], h, cell)
                    seq[t] = h[0] if isinstance(h, tuple) else h
                outs.append(torch.stack(seq, 1) if T else x.new_zeros(B, 0, self.hidden_size))
                finals.append(h)
            x = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
            if layer < self.num_layers - 1 and self.dropout > 0:
                x = self.drop(x)
        output = x if self.batch_first else x.transpose(0, 1)
        return self._pack(output, finals, unbatched)

    def _split_hx(self, hx, B, ref, unbatched):
        n = self.num_layers * self.num_directions
        if hx is None:
            return [self._init_state(B, ref) for _ in range(n)]
        if unbatched:
            hx = hx.unsqueeze(1)
        return [hx[i] for i in range(n)]

    def _pack(self, output, finals, unbatched):
        h_n = torch.stack(finals, 0)
        if unbatched:
            return output.squeeze(1 if not self.batch_first else 0), h_n.squeeze(1)
        return output, h_n


def _install_name_hooks(module: nn.Module) -> None:
    module.register_state_dict_post_hook(_write_torch_names)
    module.register_load_state_dict_pre_hook(_read_torch_names)


def _write_torch_names(module, state_dict, prefix, local_metadata) -> None:
    """``state_dict`` post-hook: with ``module.torch_state_dict_names``, replace own parameter
    names by torch's (stacked q/k/v projections become ``in_proj_weight`` ...)."""
    if not getattr(module, "torch_state_dict_names", False):
        return
    # this module's entries are the last ones written: re-append them in torch's order
    mine = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    for torch_name, own in module._name_map():
        if all(prefix + n in mine for n in own):
            parts = [mine.pop(prefix + n) for n in own]
            state_dict[prefix + torch_name] = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    state_dict.update(mine)


def _read_torch_names(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """``load_state_dict`` pre-hook: accept torch's parameter names (split stacked ones)."""
    for torch_name, own in module._name_map():
        key = prefix + torch_name
        if key in state_dict and not any(prefix + n in state_dict for n in own):
            value = state_dict.pop(key)
            parts = (value,) if len(own) == 1 else value.chunk(len(own), 0)
            for n, v in zip(own, parts):
                state_dict[prefix + n] = v


class DPRNN(DPRNNBase):
    """Elman RNN, ``h' = act(W_ih x + b_ih + W_hh h + b_hh)`` with ``act`` tanh or relu; a
    vmappable, ghost-supported drop-in for ``nn.RNN``."""

    mode = "RNN"
    gates = 1

    def __init__(self, *args, nonlinearity: str = "tanh", **kwargs):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(*args, **kwargs)

    def _cell(self, gx, h, cell):
        pre = gx + cell.hh(h)
        return torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)


class DPGRU(DPRNNBase):
    """GRU with torch's equations and gate order (r, z, n)::

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h

    a vmappable, ghost-supported drop-in for ``nn.GRU``."""

    mode = "GRU"
    gates = 3

    def _cell(self, gx, h, cell):
        gh = cell.hh(h)
        xr, xz, xn = gx.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h


class DPLSTM(DPRNNBase):
    """LSTM with torch's equations and gate order (i, f, g, o); a ghost-supported drop-in for
    ``nn.LSTM`` (no ``proj_size``).  ``forward`` returns ``(output, (h_n, c_n))``."""

    mode = "LSTM"
    gates = 4

    def _init_state(self, batch, ref):
        z = ref.new_zeros(batch, self.hidden_size)
        return (z, z)

    def _split_hx(self, hx, B, ref, unbatched):
        n = self.num_layers * self.num_directions
        if hx is None:
            return [self._init_state(B, ref) for _ in range(n)]
        h0, c0 = hx
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        return [(h0[i], c0[i]) for i in range(n)]

    def _cell(self, gx, state, cell):
        h, c = state
        i, f, g, o = (gx + cell.hh(h)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def _pack(self, output, finals, unbatched):
        h_n = torch.stack([h for h, _ in finals], 0)
        c_n = torch.stack([c for _, c in finals], 0)
        if unbatched:
            return output.squeeze(1 if not self.batch_first else 0), (h_n.squeeze(1), c_n.squeeze(1))
        return output, (h_n, c_n)


class DPMultiheadAttention(nn.Module):
    """Multi-head attention over separate ``nn.Linear`` projections: a drop-in for
    ``nn.MultiheadAttention`` that the ghost engine supports (torch's module keeps its input
    projection as a bare ``in_proj_weight`` and calls ``out_proj`` functionally, so hooks cannot
    see them).  Computes ``softmax(q k^T / sqrt(d_head) + mask) v`` per head, like torch.

    Arguments and ``forward`` follow ``nn.MultiheadAttention`` (``kdim``/``vdim``,
    ``batch_first``, ``key_padding_mask``, ``attn_mask`` boolean or additive, ``need_weights``,
    ``average_attn_weights``, ``is_causal``); ``add_bias_kv`` and ``add_zero_attn`` are not
    supported.  :meth:`from_torch` copies a torch module's weights.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise ValueError("DPMultiheadAttention does not support add_bias_kv / add_zero_attn")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        kw = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.batch_first, self.dropout = batch_first, float(dropout)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.attn_drop = nn.Dropout(self.dropout)
        self.reset_parameters()
        self.torch_state_dict_names = False
        _install_name_hooks(self)

    # -- what torch's Transformer layers read from their ``self_attn`` -------------------------
    @property
    def _qkv_same_embed_dim(self) -> bool:
        return self.kdim == self.embed_dim and self.vdim == self.embed_dim

    @property
    def in_proj_weight(self) -> torch.Tensor | None:
        """torch's stacked ``[3E, E]`` input projection (a fresh ``cat`` of the three
        projections, so torch's inference fast paths see the current weights); ``None`` when
        ``kdim``/``vdim`` differ from ``embed_dim``, as in torch."""
        if not self._qkv_same_embed_dim:
            return None
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], 0)

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """torch's stacked ``[3E]`` input bias (``None`` without bias)."""
        if self.q_proj.bias is None:
            return None
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias], 0)

    @property
    def bias_k(self):  # torch's attributes for add_bias_kv, which the drop-in does not support
        return None

    bias_v = bias_k
    add_zero_attn = False

    def merge_masks(self, attn_mask, key_padding_mask, query):
        """torch's mask merging for its fused inference path (same function as
        ``nn.MultiheadAttention.merge_masks``)."""
        return nn.MultiheadAttention.merge_masks(self, attn_mask, key_padding_mask, query)

    def _name_map(self) -> list[tuple[str, tuple[str, ...]]]:
        """``(torch name, (own names stacked along dim 0))``; ``out_proj.*`` agree already."""
        if self._qkv_same_embed_dim:
            out = [("in_proj_weight", ("q_proj.weight", "k_proj.weight", "v_proj.weight"))]
        else:
            out = [(f"{n}_proj_weight", (f"{n}_proj.weight",)) for n in "qkv"]
        if self.q_proj.bias is not None:
            out.append(("in_proj_bias", ("q_proj.bias", "k_proj.bias", "v_proj.bias")))
        return out

    def reset_parameters(self) -> None:
        """torch's initialisation: Xavier-uniform projections, zero biases."""
        # torch initialises the stacked [3E, E] in_proj_weight with one xavier bound
        bound = math.sqrt(6.0 / (self.embed_dim + 3 * self.embed_dim)) if self.kdim == self.vdim == self.embed_dim else None
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            if bound is None:
                nn.init.xavier_uniform_(lin.weight)
            else:
                nn.init.uniform_(lin.weight, -bound, bound)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> DPMultiheadAttention:
        """A drop-in computing the same function as ``module``."""
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("add_bias_kv / add_zero_attn are not supported")
        p = module.out_proj.weight
        new = cls(
            module.embed_dim, module.num_heads, module.dropout, bias=module.in_proj_bias is not None,
            kdim=module.kdim, vdim=module.vdim, batch_first=module.batch_first, device=p.device, dtype=p.dtype,
        )
        E = module.embed_dim
        with torch.no_grad():
            if module._qkv_same_embed_dim:
                ws = module.in_proj_weight.split(E, 0)
            else:
                ws = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
            for lin, w in zip((new.q_proj, new.k_proj, new.v_proj), ws):
                lin.weight.copy_(w)
            if module.in_proj_bias is not None:
                for lin, b in zip((new.q_proj, new.k_proj, new.v_proj), module.in_proj_bias.split(E, 0)):
                    lin.bias.copy_(b)
            new.out_proj.weight.copy_(module.out_proj.weight)
            if module.out_proj.bias is not None:
                new.out_proj.bias.copy_(module.out_proj.bias)
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        """``(attn_output, attn_weights or None)`` with torch's shapes."""
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1 if not self.batch_first else 0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:  # the projections see batch-first tensors
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, T, S, H, D = query.shape[0], query.shape[1], key.shape[1], self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(B, T, H, D).transpose(1, 2)
        k = self.k_proj(key).reshape(B, S, H, D).transpose(1, 2)
        v = self.v_proj(value).reshape(B, S, H, D).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)  # [B, H, T, S]
        scores = scores + self._mask(attn_mask, key_padding_mask, is_causal, B, T, S, scores)
        weights = torch.softmax(scores, dim=-1)
        weights = self.attn_drop(weights)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(B, T, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1 if not self.batch_first else 0)
        if not need_weights:
            return out, None
        w = weights.mean(1) if average_attn_weights else weights
        return out, (w.squeeze(0) if unbatched else w)

    def _mask(self, attn_mask, key_padding_mask, is_causal, B, T, S, ref):
        add = torch.zeros((), dtype=ref.dtype, device=ref.device)
        neg = torch.tensor(float("-inf"), dtype=ref.dtype, device=ref.device)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=ref.device).triu(1)
        if attn_mask is not None:
            m = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(B, self.num_heads, T, S)
            m = torch.where(m, neg, add) if m.dtype == torch.bool else m.to(ref.dtype)
            add = add + m
        if key_padding_mask is not None:
            m = key_padding_mask.reshape(B, 1, 1, S)
            m = torch.where(m, neg, torch.zeros((), dtype=ref.dtype, device=ref.device)) if m.dtype == torch.bool else m.to(ref.dtype)
            add = add + m
        return add
