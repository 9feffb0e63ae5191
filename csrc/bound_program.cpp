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
//   ChainProgram  a whole model whose forward is a plain chain (chained.py): its steps (bound calls, layer programs,
//                 flattens) run back to back; None where any watch of its own or of its layer programs is stale.
//                 Between two stages of resnet50 at batch 1 the interpreter ran about 0.25 ms (cold caches, the
//                 stage's Python checks), some 1.2 ms of a 48 ms forward in all
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
  // args: the op's positional arguments, any tensor at x_at and residual_at (both replaced per call; residual_at -1:
  // the op takes none); donate_at: the bool argument that says the residual may take the output (-1: none).
  BoundCall(const std::string& name, const std::string& overload, const py::tuple& args, int64_t x_at,
            int64_t residual_at, int64_t donate_at)
      : op_(c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str())),
        x_at_(x_at),
        residual_at_(residual_at),
        donate_at_(donate_at) {
    args_ = torch::jit::createStackForSchema(op_.schema(), torch::jit::tuple_slice(args), py::kwargs(), std::nullopt);
    const auto n = static_cast<int64_t>(args_.size());
    TORCH_CHECK(0 <= x_at && x_at < n && -1 <= residual_at && residual_at < n && donate_at < n &&
                    (residual_at >= 0 || donate_at < 0),
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
    if (residual_at_ >= 0) stack[residual_at_] = residual.has_value() ? c10::IValue(*residual) : c10::IValue();
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

// Runs `body` with the GIL released and the CPU block cache on, as the Python op calls and the blocks' forwards run
// (ops/cpu_cache.py).
template <typename Body>
at::Tensor run_released(const Body& body) {
  py::gil_scoped_release no_gil;
  const bool previous = cpu::block_cache_scope(true);
  try {
    at::Tensor y = body();
    cpu::block_cache_scope(previous);
    return y;
  } catch (...) {
    cpu::block_cache_scope(previous);
    throw;
  }
}

// TensorWatches and AttrWatches (tensor_watch.h), all checked with the GIL held.
class Watches {
 public:
  explicit Watches(const std::vector<py::object>& watches) {
    for (const auto& w : watches) {
      if (py::isinstance<TensorWatch>(w))
        tensors_.push_back(w);
      else if (py::isinstance<AttrWatch>(w))
        attrs_.push_back(w);
      else
        TORCH_CHECK(false, "watches must be TensorWatch or AttrWatch objects");
    }
  }

  bool are_current() const {
    for (const auto& w : tensors_)
      if (!py::cast<const TensorWatch&>(w).is_current()) return false;
    for (const auto& w : attrs_)
      if (!py::cast<const AttrWatch&>(w).is_current()) return false;
    return true;
  }

 private:
  std::vector<py::object> tensors_, attrs_;
};

class LayerProgram {
 public:
  // watches: the blocks' TensorWatches and AttrWatches (tensor_watch.h), all current at every run
  LayerProgram(std::vector<std::shared_ptr<BlockProgram>> blocks, const std::vector<py::object>& watches)
      : blocks_(std::move(blocks)), watches_(watches) {
    TORCH_CHECK(!blocks_.empty(), "LayerProgram: needs at least one block");
  }

  bool is_current() const { return watches_.are_current(); }

  // The blocks without the checks and with the GIL as the caller holds it.
  at::Tensor run_blocks(const at::Tensor& x) const {
    at::Tensor y = x;
    for (size_t i = 0; i < blocks_.size(); ++i) y = blocks_[i]->run(y, i > 0);
    return y;
  }

  py::object run(const at::Tensor& x) const {
    if (!is_current()) return py::none();
    return py::cast(run_released([&] { return run_blocks(x); }));
  }

 private:
  std::vector<std::shared_ptr<BlockProgram>> blocks_;
  Watches watches_;
};

class ChainProgram {
 public:
  // steps: each a BoundCall (called with x alone), a LayerProgram, or a (start_dim, end_dim) pair (x.flatten)
  ChainProgram(const std::vector<py::object>& steps, const std::vector<py::object>& watches) : watches_(watches) {
    TORCH_CHECK(!steps.empty(), "ChainProgram: needs at least one step");
    for (const auto& step : steps) {
      Step s;
      if (py::isinstance<BoundCall>(step)) {
        s.call = py::cast<std::shared_ptr<BoundCall>>(step);
      } else if (py::isinstance<LayerProgram>(step)) {
        s.layer = py::cast<std::shared_ptr<LayerProgram>>(step);
        layers_.push_back(s.layer);
      } else if (py::isinstance<py::tuple>(step) && py::len(step) == 2) {
        const auto dims = py::cast<std::pair<int64_t, int64_t>>(step);
        s.flatten = true;
        s.start_dim = dims.first;
        s.end_dim = dims.second;
      } else {
        TORCH_CHECK(false, "ChainProgram: a step must be a BoundCall, a LayerProgram or a (start_dim, end_dim) "
                           "pair, got ", std::string(py::str(py::type::of(step))));
      }
      steps_.push_back(std::move(s));
    }
  }

  py::object run(const at::Tensor& x) const {
    if (!watches_.are_current()) return py::none();
    for (const auto& layer : layers_)
      if (!layer->is_current()) return py::none();
    return py::cast(run_released([&] {
      at::Tensor y = x;
      for (const auto& step : steps_) {
        if (step.call)
          y = step.call->run(y, std::nullopt, false);
        else if (step.layer)
          y = step.layer->run_blocks(y);
        else
          y = y.flatten(step.start_dim, step.end_dim);
      }
      return y;
    }));
  }

 private:
  struct Step {
    std::shared_ptr<BoundCall> call;
    std::shared_ptr<LayerProgram> layer;
    bool flatten = false;
    int64_t start_dim = 0, end_dim = -1;
  };
  std::vector<Step> steps_;
  std::vector<std::shared_ptr<LayerProgram>> layers_;
  Watches watches_;
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
  py::class_<LayerProgram, std::shared_ptr<LayerProgram>>(m, "LayerProgram",
                           "Fused blocks back to back in C++; None where a block's tensors or attributes changed.")
      .def(py::init<std::vector<std::shared_ptr<BlockProgram>>, const std::vector<py::object>&>(), py::arg("blocks"),
           py::arg("watches"))
      .def("__call__", &LayerProgram::run, py::arg("x"));
  py::class_<ChainProgram>(m, "ChainProgram",
                           "A model's plain chain of steps in C++; None where anything it was made from changed.")
      .def(py::init<const std::vector<py::object>&, const std::vector<py::object>&>(), py::arg("steps"),
           py::arg("watches"))
      .def("__call__", &ChainProgram::run, py::arg("x"));
}

}  // namespace resnet_fused
