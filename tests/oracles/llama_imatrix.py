"""llama.cpp's own imatrix statistics, collected through llama-cpp-python's `cb_eval`.

llama-imatrix is not shipped, but the scheduler callback it uses is (research note
imatrix-and-quants.md §5). This is a faithful port of IMatrixCollector::collect_imatrix for
dense MUL_MAT nodes and the stacked experts' MUL_MAT_ID nodes (a mixture of experts: one row of
sums and one count per expert, slot by slot over the routing ids): one sequence per decode
(n_batch = n_ubatch = n_ctx), logits for all positions, BOS replacing the first token of each
chunk, float32 accumulation token by token.
"""

import ctypes

import numpy as np

from ggquant.formats.gguf import GGUFReader
from ggquant.runtime.tokenizer import Tokenizer

# struct ggml_tensor field offsets on x86-64 (research note §5, sizeof 336)
OFF_TYPE, OFF_NE, OFF_NB, OFF_OP, OFF_SRC, OFF_DATA, OFF_NAME = 0, 16, 48, 80, 152, 248, 256
GGML_TYPE_F32 = 0


def _op_id(lib, name: str) -> int:
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    for i in range(200):
        if lib.ggml_op_name(i) == name.encode():
            return i
    raise RuntimeError(f"ggml op {name} not found")


def _i64s(addr, n):
    return list((ctypes.c_int64 * n).from_address(addr))


def _name(addr):
    return ctypes.string_at(addr + OFF_NAME).decode()


def _strided(t, dtype, itemsize):
    """The data of ggml tensor t (host memory) as a numpy view [ne3, ne2, ne1, ne0]."""
    ne, nb = _i64s(t + OFF_NE, 4), _i64s(t + OFF_NB, 4)
    data = ctypes.c_void_p.from_address(t + OFF_DATA).value
    size = (ne[3] - 1) * nb[3] + (ne[2] - 1) * nb[2] + (ne[1] - 1) * nb[1] + ne[0] * itemsize
    buf = (ctypes.c_char * size).from_address(data)
    return np.lib.stride_tricks.as_strided(np.frombuffer(buf, dtype=dtype), shape=(ne[3], ne[2], ne[1], ne[0]),
                                           strides=(nb[3], nb[2], nb[1], nb[0]))


def _weight_name(src0):
    """imatrix.cpp filter_tensor_name: the part after '#' of a name with one."""
    name = _name(src0)
    return name.split("#")[1] if "#" in name else name


def _collect_experts(t, src0, src1, stats):
    """imatrix.cpp collect_imatrix, the MUL_MAT_ID branch: ids [n_used, n_tokens] (src[2], not
    contiguous), src1 [cols, ne11, n_tokens]; for idx in slots, for row in tokens: the expert's
    row of sums += x^2 (x = src1[row, idx % ne11]) in float32, its count += 1."""
    ids_t = (ctypes.c_void_p * 3).from_address(t + OFF_SRC)[2]
    ids = _strided(ids_t, np.int32, 4)[0, 0]  # [n_tokens, n_used]
    x = _strided(src1, np.float32, 4)[0]  # [n_tokens, ne11, cols]
    n_as = _i64s(src0 + OFF_NE, 4)[2]
    e = stats.setdefault(_weight_name(src0), [np.zeros((n_as, x.shape[-1]), np.float32), np.zeros(n_as, np.int64)])
    for idx in range(ids.shape[1]):
        for row in range(ids.shape[0]):
            ex = int(ids[row, idx])
            r = x[row, idx % x.shape[1]]
            e[0][ex] += r * r
            e[1][ex] += 1


def collect(model_path, chunks: list[list[int]], n_ctx: int, threads: int = 2) -> dict:
    """Returns {weight name: (sums float32 [n_in], count)} as llama-imatrix would accumulate;
    for stacked experts (sums float32 [n_expert, n_in], counts int64 [n_expert])."""
    import llama_cpp

    from tests.oracles.ggml import libggml_base

    mul_mat = _op_id(libggml_base(), "MUL_MAT")
    mul_mat_id = _op_id(libggml_base(), "MUL_MAT_ID")
    stats: dict[str, list] = {}
    errors: list[BaseException] = []

    def cb(t, ask, _ud):
        try:
            op = ctypes.c_int32.from_address(t + OFF_OP).value
            if op == mul_mat_id:  # imatrix.cpp: "collect all indirect matrix multiplications"
                if not ask:
                    src0, src1 = (ctypes.c_void_p * 2).from_address(t + OFF_SRC)
                    _collect_experts(t, src0, src1, stats)
                return True
            if op != mul_mat:
                return False
            src0, src1 = (ctypes.c_void_p * 2).from_address(t + OFF_SRC)
            ne = _i64s(src1 + OFF_NE, 4)
            wname = _weight_name(src0)
            if ne[1] < 16 or ctypes.c_int32.from_address(src1 + OFF_TYPE).value != GGML_TYPE_F32:
                return False
            if not wname.startswith("blk."):
                return False
            if ask:
                return True
            rows = _strided(src1, np.float32, 4).reshape(-1, ne[0])
            e = stats.setdefault(wname, [np.zeros(ne[0], np.float32), 0])
            for r in rows:  # token by token, float32 (imatrix.cpp loop order)
                e[0] += r * r
            e[1] += rows.shape[0]
            return True
        except BaseException as exc:  # never let a Python exception cross into C
            errors.append(exc)
            return False

    cb_c = llama_cpp.ggml_backend_sched_eval_callback(cb)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mp)
    assert model, model_path
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
    cp.n_threads = cp.n_threads_batch = threads
    cp.type_k = cp.type_v = GGML_TYPE_F32
    cp.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.cb_eval = cb_c
    cp.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(model, cp)
    assert ctx
    try:
        for ids in chunks:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
            try:
                for i, tid in enumerate(ids):
                    batch.token[i] = tid
                    batch.pos[i] = i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1
                batch.n_tokens = len(ids)
                assert llama_cpp.llama_decode(ctx, batch) == 0
            finally:
                llama_cpp.llama_batch_free(batch)
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    if errors:
        raise errors[0]
    return {k: (v[0], v[1]) for k, v in stats.items()}


def chunks_like_llama_imatrix(model_path, text, ctx, n_chunks):
    """The token chunks llama-imatrix evaluates: the text tokenized with BOS, cut into ctx-token
    chunks, the first token of each replaced by BOS when the vocabulary adds one (imatrix.cpp
    compute_imatrix: `if (add_bos && j == 0)`)."""
    with GGUFReader(model_path) as r:
        tok = Tokenizer.from_gguf(r)
    ids = tok.encode(text, add_special=True)
    out = []
    for c in range(n_chunks):
        chunk = list(ids[c * ctx:(c + 1) * ctx])
        if tok.add_bos:
            chunk[0] = tok.bos_id
        out.append(chunk)
    return out
