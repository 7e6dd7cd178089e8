// The one Python module of the extension, fastalign._C: every op declared in fastalign.h, one m.def each.
#include "fastalign.h"

// Every op runs without the GIL (py::call_guard): the kernels touch no Python object, and Python threads keep
// running meanwhile (a progress bar; the benches' memory sampler, which would otherwise miss the op's peak).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastalign C++ CPU kernels";
  using no_gil = py::call_guard<py::gil_scoped_release>;
  m.def("linear_logprobs_forward", &linear_logprobs_forward, "forward: {logp, lse}", no_gil(),
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"), py::arg("temperature"),
        py::arg("softcap"), py::arg("block_n"), py::arg("block_v"));
  m.def("linear_logprobs_backward", &linear_logprobs_backward, "backward: {d_hidden, d_weight, d_bias}", no_gil(),
        py::arg("grad"), py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"), py::arg("lse"),
        py::arg("temperature"), py::arg("softcap"), py::arg("need_hidden"), py::arg("need_weight"),
        py::arg("need_bias"), py::arg("grad_filter_eps"), py::arg("block_n"), py::arg("block_v"));
  m.def("rows_logsumexp_", &rows_logsumexp_, "in place on a logits tile; returns {logp, lse, shift}", no_gil(),
        py::arg("tile"), py::arg("targets"), py::arg("softcap"));
  m.def("rows_dlogits_", &rows_dlogits_, "in place: tile <- coeff * (onehot - softmax) * softcap' / tau", no_gil(),
        py::arg("tile"), py::arg("lse"), py::arg("shift"), py::arg("targets"), py::arg("coeff"), py::arg("softcap"),
        py::arg("inv_temp"));
  m.def("chunk_gemms_", &chunk_gemms_,
        "a thin chunk's GEMMs in one vocabulary pass; returns [E'^T W or [0, H], next max, next sum of exp]",
        no_gil(), py::arg("tile"), py::arg("rows"), py::arg("scaled_hidden"), py::arg("weight"), py::arg("d_weight"),
        py::arg("first"), py::arg("need_p"), py::arg("next_hidden"), py::arg("bias"), py::arg("alpha"),
        py::arg("exp_shift"), py::arg("targets"), py::arg("d_bias"), py::arg("bias_scale"),
        py::arg("target_values"));
  m.def("chunk_step_", &chunk_step_,
        "one chunk of the fused thin-chunk pass: its gradients, then the next rows' logits, statistics and logp",
        no_gil(), py::arg("tile"), py::arg("weight"), py::arg("bias"), py::arg("alpha"), py::arg("hidden"),
        py::arg("targets"), py::arg("logp"), py::arg("stats"), py::arg("start"), py::arg("stop"),
        py::arg("next_start"), py::arg("next_stop"), py::arg("coeff"), py::arg("d_weight"), py::arg("d_hidden"),
        py::arg("d_bias"), py::arg("first"));
  m.def("chunk_gemms_supported", &chunk_gemms_supported,
        "whether this CPU runs chunk_gemms_ (AVX-512F and BW, or AVX2 and FMA)", no_gil());
  m.def("chunk_amx_supported", &chunk_amx_supported,
        "whether this CPU and OS run chunk_gemms_'s d_weight update on AMX (AMX-TILE, AMX-BF16, AVX512-BF16)", no_gil());
  m.def("set_chunk_amx", &set_chunk_amx, "turn chunk_gemms_'s AMX path on or off (on by default); returns the old "
        "setting", no_gil(), py::arg("enabled"));
  m.def("set_chunk_avx512", &set_chunk_avx512, "let chunk_gemms_ use AVX-512 where the CPU has it (on by default; "
        "off, the AVX2 tiles run); returns the old setting", no_gil(), py::arg("enabled"));
  m.def("chunk_gemms_isa", &chunk_gemms_isa, "the tiles chunk_gemms_ runs now: avx512+amx, avx512, avx2 or '' "
        "(unsupported)", no_gil());
  // the Python side uses chunk_gemms_ only from an extension with this contract (an older prebuilt one had another;
  // 4: chunk_step_ is there too)
  m.attr("chunk_gemms_version") = 4;
  m.def("nn_count", &nn_count, "nearest-neighbour counts of uniform box samples per alternative (int64 [M])", no_gil(),
        py::arg("points"), py::arg("sq_norms"), py::arg("group_start"), py::arg("keys"), py::arg("width"),
        py::arg("num_samples"), py::arg("block_samples"), py::arg("block_alternatives"), py::arg("kernel") = "auto");
  m.def("nn_count_kernels", &nn_count_kernels, "nn_count's micro-kernels on this CPU, widest first", no_gil());
}
