"""The data of LUKS-encrypted qcow2 images (``encrypt.format=luks``): reading, writing,
creating them and changing their key slots.

The LUKS header lives in the qcow2 file at the place the header's encryption
extension gives; its key slots are unlocked with the passphrase (``qcow2.luks``) the
first time guest data is read, not at open (``info`` needs no key, as with qemu-img).
Data clusters are whole 512-byte sectors encrypted with the LUKS cipher, the IV taken
from the *host* offset (QEMU's ``crypt_physical_offset``, always on for LUKS).  Reads
that do not cover whole sectors read and decrypt the sectors around them; writes
encrypt a copy of the data, completing partial sectors from what they hold.  The old
AES-CBC method (crypt_method 1) can be created (``encryption=on``, as qemu-img 7.2
does), read and written (AES-128-CBC, the passphrase as the key, IVs from the
*guest* offset: a cluster's data is tied to where the guest sees it, so the engine
passes both offsets).

The passphrase is kept in a bytearray that is zeroed once the key is unlocked (or the
image closed); the master key then lives only in the cipher objects.  An image opened
for writing is unlocked at open, so a wrong key writes nothing.  Creating
(which puts the LUKS area in clusters allocated after the new
image's tables, as QEMU does, and changing key slots live in ``qcow2.luks_image``.
"""

from __future__ import annotations


from . import constants as C
from .ciphers import SECTOR
from .errors import CorruptImageError, InvalidKeyError, UnsupportedFeatureError
from .lightweight import Lock


def passphrase_bytes(key) -> bytearray:
    """A passphrase (str: UTF-8, or bytes) as a bytearray that can be wiped."""
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
        self._key = None if key is None else passphrase_bytes(key)
        self.cipher = None
        self._unlock = Lock()       # one unlock, whichever thread reads first
        self._failed: InvalidKeyError | None = None

    def wipe(self) -> None:
        if self._key is not None:
            self._key[:] = bytes(len(self._key))
            self._key = None

    def ready(self):
        """The unlocked sector cipher (unlocking now if needed)."""
        if self.cipher is not None:
            return self.cipher
        with self._unlock:
            if self._failed is not None:       # (the passphrase is wiped: same answer)
                raise self._failed
            if self.cipher is None:
                try:
                    self.cipher = self._unlocked()
                except InvalidKeyError as exc:
                    self._failed = exc
                    raise
        return self.cipher

    def _unlocked(self):
        h = self.header
        if self._key is None:
            raise InvalidKeyError(f"'{self.filename}' is encrypted: a key is needed to read "
                                  f"its data (key=... / --object secret,... with "
                                  f"encrypt.key-secret)")
        if h.crypt_method == C.CRYPT_AES:
            # the legacy method: the passphrase itself (up to 16 bytes, zero-padded) is
            # the AES-128 key, CBC with plain64 IVs from the *guest* offset
            from .ciphers import SectorCipher
            key = bytearray(16)
            n = min(16, len(self._key))
            key[:n] = self._key[:n]
            self.wipe()
            try:
                return SectorCipher(bytes(key), "cbc", "plain64")
            finally:
                key[:] = bytes(16)
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
        return luks.sector_cipher(master)

    def check_writable(self) -> None:
        """Opened for writing: unlocked now (a wrong or missing key is refused before
        anything is written), data in the image file."""
        if self.header.has_data_file:
            raise UnsupportedFeatureError(f"'{self.filename}': writing encrypted images "
                                          f"with an external data file is not supported",
                                          feature="encryption with data file")
        self.ready()

    @property
    def legacy(self) -> bool:
        """The legacy AES method: its IVs count sectors from the *guest* offset, so its
        reads and writes need the guest offset of the data besides the host one."""
        return self.header.crypt_method == C.CRYPT_AES

    def _first_iv(self, lo: int, host: int, guest: int | None) -> int:
        """The IV number of the sector at host offset ``lo`` of data that lies at
        ``host`` and, for the guest, at ``guest``."""
        if not self.legacy:
            return lo // SECTOR
        if guest is None:
            raise UnsupportedFeatureError("legacy AES-encrypted data is read and written "
                                          "only with its guest offset",
                                          feature="legacy encryption")
        if (host - guest) % SECTOR:
            raise CorruptImageError(f"'{self.filename}': data at {host:#x} is not "
                                    f"sector-aligned with its guest offset", offset=host,
                                    size=0, what="L2 entry")
        return (lo - host + guest) // SECTOR

    def read_into(self, be, dst, host: int, guest: int | None = None) -> None:
        """Guest data of ``len(dst)`` bytes stored at ``host`` (guest offset ``guest``:
        the legacy method's IVs count from it): read and decrypted."""
        cipher = self.ready()
        n = len(dst)
        lo = host - host % SECTOR
        hi = -(-(host + n) // SECTOR) * SECTOR
        iv = self._first_iv(lo, host, guest)
        if lo == host and hi == host + n:
            buf = dst
        else:
            buf = memoryview(bytearray(hi - lo))
        got = be.readinto(buf, lo)
        if got < len(buf):
            buf[got:] = bytes(len(buf) - got)
        cipher.decrypt(buf, iv)
        if buf is not dst:
            dst[:] = buf[host - lo:host - lo + n]

    def write(self, be, data, host: int, guest: int | None = None) -> None:
        """Encrypt guest ``data`` and write it at ``host`` (guest offset ``guest``: the
        legacy method's IVs count from it): a copy is encrypted (the caller's buffer is
        left as it is); partial sectors at either end are read, decrypted and completed
        first."""
        cipher = self.ready()
        src = memoryview(data).cast("B")
        n = len(src)
        lo = host - host % SECTOR
        hi = -(-(host + n) // SECTOR) * SECTOR
        iv = self._first_iv(lo, host, guest)
        shift = None if guest is None else guest - host     # guest = host + shift
        buf = bytearray(hi - lo)
        bv = memoryview(buf)
        if lo < host:
            self.read_into(be, bv[:SECTOR], lo, None if shift is None else lo + shift)
        if hi > host + n and (hi - SECTOR >= lo + SECTOR or lo == host):
            self.read_into(be, bv[-SECTOR:], hi - SECTOR,
                           None if shift is None else hi - SECTOR + shift)
        bv[host - lo:host - lo + n] = src
        cipher.encrypt(bv, iv)
        be.pwrite(bv, lo)


__all__ = ["DataCrypto", "passphrase_bytes"]
