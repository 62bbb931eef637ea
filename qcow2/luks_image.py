"""LUKS inside a qcow2 image, as a whole: making a new image an encrypted one, and
adding or erasing key slots of an encrypted image (``qemu-img amend -o encrypt.*``).
Both keep key material in bytearrays zeroed when done."""

from __future__ import annotations

from . import constants as C
from .encrypted import passphrase_bytes
from .errors import CorruptImageError, InvalidKeyError, UnsupportedFeatureError


def install_encryption(fd: int, name: str, enc) -> None:
    """Make the new, empty qcow2 image open as ``fd`` an encrypted one (``enc``: a
    ``qcow2.encryptopts.CreateEncryption``), as QEMU's create does: LUKS gets its header
    and key slots in clusters allocated after the image's tables, named by the header's
    encryption extension; the legacy AES method only sets ``crypt_method``."""
    from .backends.file import FileBackend
    from .opener import open_image
    img = open_image(FileBackend(fd=fd, writable=True, name=name), "r+", format="qcow2",
                     backing=False)
    try:
        h = img.header
        if enc.format == "luks":
            from .luks import new_area
            area = new_area(enc.params, bytes(enc.passphrase))
            length = len(area)
            cs = img.cluster_size
            n = -(-length // cs)
            off = img.refs.alloc(n)
            area += bytes(n * cs - length)
            img.be.pwrite(area, off)
            img.file_size = max(img.file_size, off + n * cs)
            h.crypto_header = (off, length)
            h.crypt_method = C.CRYPT_LUKS
        else:
            h.crypt_method = C.CRYPT_AES
        img._rewrite_header()
    finally:
        img.close()


def amend_keyslots(img, change, passphrase, *, force: bool = False) -> None:
    """Add or erase LUKS key slots of the writable image ``img`` (``change``: a
    ``qcow2.encryptopts.AmendKeyslots``), as ``qemu-img amend -o encrypt.*`` does;
    ``passphrase`` opens the image now.  A new key's material is made durable before
    the header names its slot; an erased slot leaves the header before its material
    is overwritten."""
    from . import luks as L
    from .secrets import secret
    h = img.header
    if h.crypt_method != C.CRYPT_LUKS or h.crypto_header is None:
        raise UnsupportedFeatureError("Only LUKS encrypted images support amending key "
                                      "slots", feature="amend encryption")
    off, length = h.crypto_header
    area = bytearray(img.be.pread(length, off))
    if len(area) < length:
        raise CorruptImageError(f"LUKS header at {off:#x} is truncated", offset=off,
                                size=length, what="LUKS header")
    luks = L.LuksHeader(bytes(area[:L.HEADER_SIZE]), off, length)
    read = lambda n, o: bytes(area[o:o + n])                           # noqa: E731
    key = passphrase_bytes(passphrase if passphrase is not None else b"")
    master = None
    try:
        master = bytearray(luks.unlock(read, bytes(key)))
        active = L.active_slots(area)
        if change.active:
            slot = _slot_to_fill(change, active, force)
            new = bytearray(secret(change.new_secret))
            try:
                L.add_key(area, luks, slot, bytes(new), bytes(master), change.iter_time)
            finally:
                new[:] = bytes(len(new))
            _write_area(img, area, off, [L.slot_range(luks.key_bytes, slot)], header_last=True)
        else:
            slots = _slots_to_erase(luks, read, change, active, force)
            for slot in slots:
                L.erase_key(area, luks, slot)
            _write_area(img, area, off, [L.slot_range(luks.key_bytes, s) for s in slots],
                        header_last=False)
    finally:
        key[:] = bytes(len(key))
        if master is not None:
            master[:] = bytes(len(master))
        area[:] = bytes(len(area))


def _slot_to_fill(change, active: list, force: bool) -> int:
    if change.keyslot is not None:
        if change.keyslot in active and not force:
            raise InvalidKeyError(f"Refusing to overwrite active keyslot {change.keyslot} - "
                                  f"please erase it first")
        return change.keyslot
    free = [i for i in range(8) if i not in active]
    if not free:
        raise InvalidKeyError("Can't add a keyslot - all keyslots are in use")
    return free[0]


def _slots_to_erase(luks, read, change, active: list, force: bool) -> list:
    if change.keyslot is not None:
        if active == [change.keyslot] and not force:
            raise InvalidKeyError(f"Attempt to erase the only active keyslot "
                                  f"{change.keyslot} which will erase all the data in the "
                                  f"image irreversibly - refusing operation")
        return [change.keyslot]
    from .secrets import secret
    old = bytearray(secret(change.old_secret))
    try:
        slots = []
        for slot in luks.slots:
            found = luks.open_slot(read, slot, bytes(old))
            if found is not None:
                slots.append(slot[0])
    finally:
        old[:] = bytes(len(old))
    if not slots:
        raise InvalidKeyError("No keyslots match given (old) password for erase operation")
    if len(slots) == len(active) and not force:
        raise InvalidKeyError("All the active keyslots match the (old) password that was "
                              "given and erasing them will erase all the data in the image "
                              "irreversibly - refusing operation")
    return slots


def _write_area(img, area: bytearray, off: int, ranges: list, *, header_last: bool) -> None:
    from .luks import HEADER_SIZE
    mv = memoryview(area)

    def header() -> None:
        img.be.pwrite(mv[:HEADER_SIZE], off)
        img.be.flush()

    if not header_last:
        header()
    for start, n in ranges:
        img.be.pwrite(mv[start:start + n], off + start)
    img.be.flush()
    if header_last:
        header()


__all__ = ["install_encryption", "amend_keyslots"]
