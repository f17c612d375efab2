"""NxM blocks (``4x1``, ``1x4``, ``2x2``, ``1x1``) and channel patterns (``1xchannel``,
``channelx1``, ``Nxchannel``, ``channelxM``).

On the 2-D view ``[rows, cols]`` (rows = output channels, cols = inputs), ``NxM`` prunes blocks
of N rows by M columns. ``Nxchannel`` prunes N whole rows: N output channels (a conv filter is
all of ``Cin x k``). ``channelxM`` prunes M whole *input channels*: on a convolution, input
channel c across every output channel of its group and every kernel position, which is not a
rectangle on the view (INC prunes a column of the view instead, i.e. one kernel position).
"""
from __future__ import annotations

import re

from ..config import GroupConfig
from ..errors import ConfigError
from ..geometry import WeightGeometry
from .base import BasePattern, BlockLayout, register_pattern

_NXM = re.compile(r"^(\d+|channel)x(\d+|channel)$")


@register_pattern("NxM")
class NxMPattern(BasePattern):
    @classmethod
    def matches(cls, pattern: str) -> bool:
        m = _NXM.match(pattern)
        return bool(m) and pattern != "channelxchannel"

    @classmethod
    def check_config(cls, group: GroupConfig) -> None:
        rows, cols = _NXM.match(group.pattern).groups()
        for v in (rows, cols):
            if v != "channel" and int(v) < 1:
                raise ConfigError(f"{group.where}: pattern {group.pattern!r} needs block sides >= 1")

    def __init__(self, config, modules=None):
        super().__init__(config, modules)
        rows, cols = _NXM.match(self.pattern).groups()
        self.block_rows = None if rows == "channel" else int(rows)   # None: every row
        self.block_cols = None if cols == "channel" else int(cols)   # None: every input channel

    @property
    def is_channel(self) -> bool:
        return self.block_rows is None or self.block_cols is None

    @property
    def prunes_output_channels(self) -> bool:
        """``Nxchannel``: whole output channels (rows) are pruned."""
        return self.block_cols is None

    @property
    def output_channel_block(self) -> int:
        """``Nxchannel``: N consecutive output channels are one block."""
        return self.block_rows if self.prunes_output_channels else 1

    def block_layout(self, geom: WeightGeometry) -> BlockLayout | str:
        rows, cols = geom.view_shape
        if self.block_cols is None:  # Nxchannel: N whole output channels
            n = self.block_rows
            if rows % n:
                return f"{rows} output channels are not divisible by {n}"
            return BlockLayout((rows // n, n, 1, cols), (1, 3), n * cols, f"{n}x{cols}")
        if self.block_rows is None:  # channelxM: M whole input channels
            m, g, k = self.block_cols, geom.groups, geom.kernel_numel
            cin_g = geom.in_channels_per_group
            if cin_g % m:
                return f"{cin_g} input channels per group are not divisible by {m}"
            shape = (g, rows // g, k, cin_g // m, m)
            return BlockLayout(shape, (1, 2, 4), (rows // g) * k * m, f"{rows // g}x{k * m}")
        n, m = self.block_rows, self.block_cols
        if rows % n or cols % m:
            return f"view {rows}x{cols} is not divisible by the {n}x{m} block"
        return BlockLayout((rows // n, n, cols // m, m), (1, 3), n * m, f"{n}x{m}")
