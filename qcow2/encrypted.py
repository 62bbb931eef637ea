"""Reading the data of LUKS-encrypted qcow2 images (``encrypt.format=luks``).

The LUKS header lives in the qcow2 file at the place the header's encryption
extension gives; its key slots are unlocked with the passphrase (``qcow2.luks``) the
first time guest data is read, not at open (``info`` needs no key, as with qemu-img).
Data clusters are whole 512-byte sectors encrypted with the LUKS cipher, the IV taken
from the *host* offset (QEMU's ``crypt_physical_offset``, always on for LUKS).  Reads
that do not cover whole sectors read and decrypt the sectors around them; writes
encrypt a copy of the data, completing partial sectors from what they hold.  The old
AES-CBC method (crypt_method 1), which QEMU itself no longer opens, is refused.

The passphrase is kept in a bytearray that is zeroed once the key is unlocked (or the
image closed); the master key then lives only in the cipher objects.
"""

from __future__ import annotations

from . import constants as C
from .ciphers import SECTOR
from .errors import CorruptImageError, InvalidKeyError, UnsupportedFeatureError


def _as_bytes(key) -> bytearray:
    if isinstance(key, str):
        return bytearray(key.encode("utf-8"))
    return bytearray(key)


class DataCrypto:
    """The data cipher of one encrypted image, unlocked on first use."""

    def __init__(self, header, read, file_size: int, filename: str, key):
        self.header, self.read, self.file_size = header, read, file_size
        self.filename = filename
        if key is None:
            from .secrets import key_for
            key = key_for(filename)            # named by the command line's secrets
        self._key = None if key is None else _as_bytes(key)
        self.cipher = None

    def wipe(self) -> None:
        if self._key is not None:
            self._key[:] = bytes(len(self._key))
            self._key = None

    def ready(self):
        """The unlocked sector cipher (unlocking now if needed)."""
        if self.cipher is not None:
            return self.cipher
        h = self.header
        if h.crypt_method == C.CRYPT_AES:
            raise UnsupportedFeatureError(
                f"'{self.filename}' uses the old AES-CBC qcow2 encryption, which QEMU no "
                f"longer opens either; decrypt it with an old qemu-img", feature="encryption")
        if self._key is None:
            raise InvalidKeyError(f"'{self.filename}' is encrypted: a key is needed to read "
                                  f"its data (key=... / --object secret,... with "
                                  f"encrypt.key-secret)")
        if h.crypto_header is None:
            raise CorruptImageError(f"'{self.filename}' is LUKS-encrypted but has no "
                                    f"encryption header extension", offset=0, size=0,
                                    what="header")
        from .luks import read_luks_header
        off, length = h.crypto_header
        luks = read_luks_header(self.read, off, length, self.file_size)
        try:
            master = luks.unlock(lambda n, o: self.read(n, off + o), bytes(self._key))
        finally:
            self.wipe()
        self.cipher = luks.sector_cipher(master)
        return self.cipher

    def check_writable(self) -> None:
        """Opened for writing: unlocked now (a wrong or missing key is refused before
        anything is written), LUKS only, data in the image file."""
        if self.header.has_data_file:
            raise UnsupportedFeatureError(f"'{self.filename}': writing encrypted images "
                                          f"with an external data file is not supported",
                                          feature="encryption with data file")
        self.ready()

    def read_into(self, be, dst, host: int) -> None:
        """Guest data of ``len(dst)`` bytes stored at ``host``: read and decrypted."""
        cipher = self.ready()
        n = len(dst)
        lo = host - host % SECTOR
        hi = -(-(host + n) // SECTOR) * SECTOR
        if lo == host and hi == host + n:
            buf = dst
        else:
            buf = memoryview(bytearray(hi - lo))
        got = be.readinto(buf, lo)
        if got < len(buf):
            buf[got:] = bytes(len(buf) - got)
        cipher.decrypt(buf, lo // SECTOR)
        if buf is not dst:
            dst[:] = buf[host - lo:host - lo + n]

    def write(self, be, data, host: int) -> None:
        """Encrypt guest ``data`` and write it at ``host``: a copy is encrypted (the
        caller's buffer is left as it is); partial sectors at either end are read,
        decrypted and completed first."""
        cipher = self.ready()
        src = memoryview(data).cast("B")
        n = len(src)
        lo = host - host % SECTOR
        hi = -(-(host + n) // SECTOR) * SECTOR
        buf = bytearray(hi - lo)
        bv = memoryview(buf)
        if lo < host:
            self.read_into(be, bv[:SECTOR], lo)
        if hi > host + n and (hi - SECTOR >= lo + SECTOR or lo == host):
            self.read_into(be, bv[-SECTOR:], hi - SECTOR)
        bv[host - lo:host - lo + n] = src
        cipher.encrypt(bv, lo // SECTOR)
        be.pwrite(bv, lo)


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
    key = _as_bytes(passphrase if passphrase is not None else b"")
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


__all__ = ["DataCrypto", "install_encryption", "amend_keyslots"]
