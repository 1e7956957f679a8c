"""TPU slices by their Cloud names ("v5p-8", "v4-32", "v5e-1", "v6e-8") as device lists libtpu compiles for on any
machine, without a TPU: the dry run's `--topology` (`jax.experimental.topologies.get_topology_desc`).

v4 and v5p names count TensorCores (two per chip; JAX sees one "megacore" device per chip, hosts of 2x2x1 chips);
v5e and v6e names count chips (one core each). HBM per chip is Google's published figure, read conservatively: v4's
"32 GiB", v5p's "95 GB", v5e's "16 GB" and v6e's "32 GB" taken as 10^9 bytes per GB.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax

GIB = 2**30
GB = 10**9


class TopologyError(ValueError):
  """The topology name is not one we know, or libtpu is not installed."""


@dataclasses.dataclass(frozen=True)
class Generation:
  cores_per_chip: int  # what the Cloud name counts per chip
  chip_config: str  # get_topology_desc's chip_config_name
  hbm_bytes: int  # per chip
  shapes: dict[int, tuple[int, ...]]  # chips -> the slice's chip grid
  host_bounds: tuple[int, int, int]  # chips per host, for slices larger than one host


_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8)}
_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
GENERATIONS = {
    "v4": Generation(2, "megacore", 32 * GIB, _3D, (2, 2, 1)),
    "v5p": Generation(2, "megacore", 95 * GB, _3D, (2, 2, 1)),
    "v5e": Generation(1, "default", 16 * GB, _2D, (2, 2, 1)),
    "v6e": Generation(1, "default", 32 * GB, _2D, (2, 2, 1)),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # "v5p-8"
  generation: str  # "v5p"
  chips: int

  @property
  def spec(self) -> Generation:
    return GENERATIONS[self.generation]

  @property
  def hbm_bytes(self) -> int:
    return self.spec.hbm_bytes

  @property
  def topology_name(self) -> str:
    return f"{self.generation}:" + "x".join(map(str, self.spec.shapes[self.chips]))

  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    grid = self.spec.shapes[self.chips]
    if len(grid) == 2 and self.chips <= 8:  # one host holds a v5e/v6e slice of up to 8 chips
      return (*grid, 1)
    return self.spec.host_bounds

  def devices(self) -> list[jax.Device]:
    """One device per chip, as a TPU run of this slice sees them (nothing executes on them)."""
    # Compiling only: no TPU is opened, so another process using libtpu (a second dry run, a test) is no conflict.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
      from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
      desc = topologies.get_topology_desc(platform="tpu", topology_name=self.topology_name,
                                          chip_config_name=self.spec.chip_config,
                                          chips_per_host_bounds=self.chips_per_host_bounds(), num_slices=1)
    except Exception as e:  # libtpu missing, or a JAX without TPU support: one line, not a stack trace
      raise TopologyError(f"--topology {self.name}: libtpu cannot describe {self.topology_name} here "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "install it with pip install -e '.[tpu]'") from None
    return list(desc.devices)


def parse_topology(name: str) -> Topology:
  """"v5p-8" -> Topology; TopologyError naming the accepted forms otherwise."""
  match = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
  if not match:
    raise TopologyError(f"--topology {name!r}: expected <generation>-<size> with generation one of "
                        f"{sorted(GENERATIONS)}, e.g. v5p-8, v4-32, v5e-1, v6e-8")
  generation, size = match.group(1), int(match.group(2))
  spec = GENERATIONS[generation]
  chips, rest = divmod(size, spec.cores_per_chip)
  if rest or chips not in spec.shapes:
    sizes = ", ".join(f"{generation}-{n * spec.cores_per_chip}" for n in spec.shapes)
    raise TopologyError(f"--topology {name!r}: not a {generation} slice size; known: {sizes}")
  return Topology(name=f"{generation}-{size}", generation=generation, chips=chips)
