"""Write imatrix GGUF files exactly as llama-imatrix lays them out (research note §1.5), with gguf-py."""

import gguf
import numpy as np


def write_imatrix_gguf(path, sums: dict, counts: dict, datasets=("test-data.txt",), chunk_count=1, chunk_size=512):
    w = gguf.GGUFWriter(str(path), arch=None)
    w.kv_data[0].pop("general.architecture", None)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", chunk_count)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(sums):
        w.add_tensor(name + ".in_sum2", np.asarray(sums[name], dtype=np.float32).reshape(-1))
        w.add_tensor(name + ".counts", np.asarray([counts[name]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
