// A fused block's eval forward replayed in C++: the op calls its Python bound steps make, without the interpreter
// between them. Between two convolutions the interpreter runs with caches the convolution just evicted, and a
// block's few dozen lines of Python (its staleness checks, the steps' closures, the op's argument parsing) took
// 10-50 us per call and 130-220 us per block boundary inside resnet50 (batch 1: 2-4 ms of a 45-50 ms forward).
//
//   BoundCall     one op call with every argument fixed except x, the residual and whether the residual's buffer may
//                 take the output (the donation of resnet_fused/ops/donation.py); optionally a second call that writes
//                 into a donated residual of a given shape (oneDNN's in-place binary post-op)
//   BlockProgram  identity = shortcut calls (x) or x;  y = main calls (x);  out = last main call (y, identity), the
//                 identity donated where it is the shortcut's own output or the caller donated x
//   LayerProgram  blocks run back to back, each block's input donated to it but the first's (FusedSequential's
//                 rule); None instead of a result where any of its watches (the blocks' tensors and module
//                 attributes, tensor_watch.h) is stale (the Python caller checks the change counter and the input's
//                 signature first)
//
// The calls go through the dispatcher, boxed, as the Python op calls do: the same kernels, in the same order, on the
// same arguments, so the outputs are bitwise the Python path's.
#include "bound_program.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cpu/block_cache.h"
#include "tensor_watch.h"

namespace resnet_fused {
namespace {

namespace py = pybind11;

bool unambiguous_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

class BoundCall {
 public:
  // args: the op's positional arguments, any tensor at x_at and residual_at (both replaced per call); donate_at: the
  // bool argument that says the residual may take the output (-1: none).
  BoundCall(const std::string& name, const std::string& overload, const py::tuple& args, int64_t x_at,
            int64_t residual_at, int64_t donate_at)
      : op_(c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str())),
        x_at_(x_at),
        residual_at_(residual_at),
        donate_at_(donate_at) {
    args_ = torch::jit::createStackForSchema(op_.schema(), torch::jit::tuple_slice(args), py::kwargs(), std::nullopt);
    const auto n = static_cast<int64_t>(args_.size());
    TORCH_CHECK(0 <= x_at && x_at < n && 0 <= residual_at && residual_at < n && donate_at < n,
                "BoundCall: argument positions out of range for ", op_.schema());
  }

  // into: called instead where the residual is donated, has `shape` and both tensors are unambiguously
  // channels_last (oneDNN's in-place post-op takes only those).
  void set_into(std::shared_ptr<BoundCall> into, std::vector<int64_t> shape) {
    into_ = std::move(into);
    into_shape_ = std::move(shape);
  }

  at::Tensor run(const at::Tensor& x, const std::optional<at::Tensor>& residual, bool donate) const {
    if (into_ && donate && residual.has_value() && residual->sizes() == at::IntArrayRef(into_shape_) &&
        unambiguous_channels_last(*residual) && unambiguous_channels_last(x))
      return into_->run(x, residual, false);
    torch::jit::Stack stack = args_;
    stack[x_at_] = x;
    stack[residual_at_] = residual.has_value() ? c10::IValue(*residual) : c10::IValue();
    if (donate_at_ >= 0) stack[donate_at_] = donate && residual.has_value();
    op_.callBoxed(stack);
    return stack.front().toTensor();
  }

 private:
  c10::OperatorHandle op_;
  torch::jit::Stack args_;
  int64_t x_at_, residual_at_, donate_at_;
  std::shared_ptr<BoundCall> into_;
  std::vector<int64_t> into_shape_;
};

class BlockProgram {
 public:
  BlockProgram(std::vector<std::shared_ptr<BoundCall>> shortcut, std::vector<std::shared_ptr<BoundCall>> main)
      : shortcut_(std::move(shortcut)), main_(std::move(main)) {
    TORCH_CHECK(!main_.empty(), "BlockProgram: the main branch needs at least one call");
  }

  at::Tensor run(const at::Tensor& x, bool donate_x) const {
    at::Tensor identity = x;
    for (const auto& call : shortcut_) identity = call->run(identity, std::nullopt, false);
    at::Tensor y = x;
    for (size_t i = 0; i + 1 < main_.size(); ++i) y = main_[i]->run(y, std::nullopt, false);
    // the shortcut's own output is read by nothing after the last call; x only where the caller says so
    return main_.back()->run(y, identity, shortcut_.empty() ? donate_x : true);
  }

 private:
  std::vector<std::shared_ptr<BoundCall>> shortcut_, main_;
};

class LayerProgram {
 public:
  // watches: the blocks' TensorWatches and AttrWatches (tensor_watch.h), all current at every run
  LayerProgram(std::vector<std::shared_ptr<BlockProgram>> blocks, const std::vector<py::object>& watches)
      : blocks_(std::move(blocks)) {
    TORCH_CHECK(!blocks_.empty(), "LayerProgram: needs at least one block");
    for (const auto& w : watches) {
      if (py::isinstance<TensorWatch>(w))
        tensors_.push_back(w);
      else if (py::isinstance<AttrWatch>(w))
        attrs_.push_back(w);
      else
        TORCH_CHECK(false, "LayerProgram: watches must be TensorWatch or AttrWatch objects");
    }
  }

  py::object run(const at::Tensor& x) const {
    for (const auto& w : tensors_)
      if (!py::cast<const TensorWatch&>(w).is_current()) return py::none();
    for (const auto& w : attrs_)
      if (!py::cast<const AttrWatch&>(w).is_current()) return py::none();
    at::Tensor y;
    {
      py::gil_scoped_release no_gil;  // as the Python op calls release it
      const bool previous = cpu::block_cache_scope(true);  // as the blocks' forwards run (ops/cpu_cache.py)
      try {
        y = x;
        for (size_t i = 0; i < blocks_.size(); ++i) y = blocks_[i]->run(y, i > 0);
      } catch (...) {
        cpu::block_cache_scope(previous);
        throw;
      }
      cpu::block_cache_scope(previous);
    }
    return py::cast(y);
  }

 private:
  std::vector<std::shared_ptr<BlockProgram>> blocks_;
  std::vector<py::object> tensors_, attrs_;
};

}  // namespace

void register_bound_program(py::module& m) {
  py::class_<BoundCall, std::shared_ptr<BoundCall>>(
      m, "BoundCall", "One op call with every argument fixed but x, the residual and the donation flag.")
      .def(py::init<const std::string&, const std::string&, const py::tuple&, int64_t, int64_t, int64_t>(),
           py::arg("name"), py::arg("overload"), py::arg("args"), py::arg("x_at"), py::arg("residual_at"),
           py::arg("donate_at"))
      .def("set_into", &BoundCall::set_into, py::arg("into"), py::arg("shape"))
      .def("__call__", &BoundCall::run, py::arg("x"), py::arg("residual"), py::arg("donate") = false,
           py::call_guard<py::gil_scoped_release>());
  py::class_<BlockProgram, std::shared_ptr<BlockProgram>>(
      m, "BlockProgram", "A fused block's eval forward: its shortcut calls, main calls and residual, in C++.")
      .def(py::init<std::vector<std::shared_ptr<BoundCall>>, std::vector<std::shared_ptr<BoundCall>>>(),
           py::arg("shortcut"), py::arg("main"))
      .def("__call__", &BlockProgram::run, py::arg("x"), py::arg("donate_x") = false,
           py::call_guard<py::gil_scoped_release>());
  py::class_<LayerProgram>(m, "LayerProgram",
                           "Fused blocks back to back in C++; None where a block's tensors or attributes changed.")
      .def(py::init<std::vector<std::shared_ptr<BlockProgram>>, const std::vector<py::object>&>(), py::arg("blocks"),
           py::arg("watches"))
      .def("__call__", &LayerProgram::run, py::arg("x"));
}

}  // namespace resnet_fused
