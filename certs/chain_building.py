"""Stop OpenSSL from building, on every handshake, the chain a context sends.

Given a leaf without its chain, OpenSSL completes the chain to send from the context's trust
store at every handshake (``ssl_add_cert_chain``: ``X509_verify_cert``, with a signature
check) and sends what it built, the root included. The peer holds that root already and
parses it for nothing: ``d2i_X509`` with OpenSSL 3's key decoder. For a mesh handshake
(P-256 leaf and root, callgrind, both sides in one process) the building cost 1.8M
instructions per connection and the extra root 3.2M, of 19.4M: a quarter. HAProxy avoids
both by giving every context an empty chain.

Python's ``ssl`` has no way to set ``SSL_MODE_NO_AUTO_CHAIN``, so ``stop_chain_building``
sets it with ctypes on the ``SSL_CTX`` that CPython's ``SSLContext`` holds right after its
object header, through the libssl that ``_ssl`` itself is linked to. It reads the context's
options back through that pointer first and compares them with ``ctx.options``; where that
does not hold, or the symbols are not there (another interpreter, an ``_ssl`` built with
OpenSSL inside), it changes nothing and says so, and the caller loads the whole chain
instead (``certs.ssl_context.presented_chain``).
"""

from __future__ import annotations

import ctypes
import functools
import platform
import ssl
from dataclasses import dataclass
from typing import Any

__all__ = ["stop_chain_building"]

SSL_CTRL_MODE = 33  # openssl/ssl.h
SSL_MODE_NO_AUTO_CHAIN = 0x8


@dataclass(frozen=True)
class _LibSsl:
    ctrl: Any  # long SSL_CTX_ctrl(SSL_CTX *, int cmd, long larg, void *parg)
    get_options: Any  # uint64_t SSL_CTX_get_options(const SSL_CTX *)


@functools.cache
def _libssl() -> _LibSsl | None:
    """The two functions, from the libssl ``_ssl`` uses (dlsym through its handle searches its
    dependencies); None where they cannot be had."""
    if platform.python_implementation() != "CPython":
        return None
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        ctrl, get_options = lib.SSL_CTX_ctrl, lib.SSL_CTX_get_options
    except (OSError, AttributeError):
        return None
    ctrl.restype = ctypes.c_long
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    get_options.restype = ctypes.c_uint64
    get_options.argtypes = [ctypes.c_void_p]
    return _LibSsl(ctrl, get_options)


def stop_chain_building(ctx: ssl.SSLContext) -> bool:
    """Set ``SSL_MODE_NO_AUTO_CHAIN`` on ctx: it then sends the certificates it was loaded
    with and nothing else. True when the mode is set; False when it could not be (ctx is
    unchanged). Call it before the context is used for a handshake."""
    lib = _libssl()
    if lib is None:
        return False
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer or lib.get_options(pointer) != ctx.options:
        return False
    mode = lib.ctrl(pointer, SSL_CTRL_MODE, SSL_MODE_NO_AUTO_CHAIN, None)
    return bool(mode & SSL_MODE_NO_AUTO_CHAIN)
