# cython: language_level=3, freethreading_compatible=False
"""The compiled hot path of mqfast: HTTP parsing, routing, decoding, batching, responses.

Everything from ``data_received`` to the response write for a produce request happens here,
without awaiting and without logging. Python (``server.py``, ``api.py``) owns lifecycle,
configuration and the routes that are not hot.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8, PyUnicode_DecodeASCII
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

import collections
import contextvars
import hashlib
import logging
import os
import re
import time

import httptools
import msgspec

from mqfast import errors as _errors
from mqfast.config import parse_duration as _parse_duration
from mqfast.messages import IDEMPOTENCY_KEY_MAX, BatchProduceRequest, IdemKey, ProduceRequest

include "_util.pyx"
include "_router.pyx"
include "_pool.pyx"
include "_batch.pyx"
include "_http.pyx"
include "_runs.pyx"
