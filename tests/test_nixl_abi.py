"""ABI guard: our engine's virtual table must match the installed NIXL wheel's own storage engine
(POSIX), slot by slot, or NIXL would call the wrong method. Read from the ELF relocations."""
import os
import re
import subprocess

import pytest

import memkv_nixl.nixl as mk

SLOTS = 27  # nixlBackendEngine virtuals in NIXL 1.0 .. 1.5.x (two destructors + 25 methods)


def _run(*cmd) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _demangle(names: list[str]) -> list[str]:
    return _run("c++filt", *names).splitlines() if names else []


def vtable_slots(so: str, vtable: str) -> list[str]:
    """Method signatures (class name removed) in the virtual-table slots of `vtable` in `so`."""
    symbols = {}
    vt_addr = None
    for flags in (["-S"], ["-D", "-S"]):
        for line in _run("nm", *flags, "--defined-only", so).splitlines():
            parts = line.split()
            if len(parts) == 4:
                addr, _size, _kind, name = parts
                symbols.setdefault(int(addr, 16), name)
                if name == vtable:
                    vt_addr = int(addr, 16)
    assert vt_addr is not None, f"{vtable} not found in {so}"
    first, end = vt_addr + 16, vt_addr + 16 + 8 * SLOTS  # after offset-to-top and typeinfo
    slots: dict[int, str] = {}
    for line in _run("readelf", "-rW", so).splitlines():
        m = re.match(r"\s*([0-9a-f]+)\s+[0-9a-f]+\s+(R_X86_64_\w+)\s+(.*)$", line)
        if not m:
            continue
        off = int(m.group(1), 16)
        if not first <= off < end:
            continue
        kind, rest = m.group(2), m.group(3).split()
        if kind == "R_X86_64_RELATIVE":
            slots[off] = symbols[int(rest[-1], 16)]
        else:  # R_X86_64_64: value, name, +, addend
            slots[off] = rest[1]
    assert len(slots) == SLOTS, f"{so}: {len(slots)} relocated slots in {vtable}, expected {SLOTS}"
    out = []
    for sig in _demangle([slots[o] for o in sorted(slots)]):
        m = re.match(r"^.*?::(~?\w+)\((.*)\)( const)?$", sig)
        assert m, sig
        out.append("~" if m.group(1).startswith("~") else f"{m.group(1)}({m.group(2)}){m.group(3) or ''}")
    return out


@pytest.mark.parametrize("flavour", ["nixl_cu12"])
def test_engine_vtable_matches_the_installed_nixl_posix_engine(flavour):
    mod = mk.nixl_module(flavour)
    site = os.path.dirname(os.path.dirname(mod.__file__))
    posix = os.path.join(site, f".{flavour}.mesonpy.libs", "plugins", "libplugin_POSIX.so")
    theirs = vtable_slots(posix, "_ZTV15nixlPosixEngine")
    ours = vtable_slots(mk.PLUGIN_FILE, "_ZTV15nixlMemkvEngine")
    lo, hi = mk.SUPPORTED
    mismatches = [f"slot {i}: NIXL has {t}, MEMKV has {o}" for i, (t, o) in enumerate(zip(theirs, ours))
                  if t != o]
    assert not mismatches, (
        f"the installed {flavour} changed the backend ABI; MEMKV supports NIXL "
        f"{'.'.join(map(str, lo))} <= v < {'.'.join(map(str, hi))}:\n" + "\n".join(mismatches))


def test_plugin_needs_no_nixl_library_at_link_time():
    needed = re.findall(r"\(NEEDED\).*\[(.*)\]", _run("readelf", "-d", mk.PLUGIN_FILE))
    assert not [n for n in needed if "nixl" in n], needed
    exported = _run("nm", "-D", "--defined-only", mk.PLUGIN_FILE).split()
    assert "nixl_plugin_init" in exported and "nixl_plugin_fini" in exported
