// bscompile-runner: run a bscompile-compiled model without Python.
//
//   bscompile-runner BUNDLE_DIR --input NAME=FILE.npy [--input ...] --output DIR
//
// BUNDLE_DIR holds manifest.json and the module library (`bscompile package` lays it
// out, and the bundle's `run` script passes its own folder). The runner checks every
// input's name, shape and dtype against the manifest, runs the module's `main` on the
// manifest's device (kDLCPU, or kDLCUDA when the manifest says "cuda"), and writes
// DIR/<output name>.npy for each output. Errors are one line on stderr and exit 1
// (2 for usage errors and for input data out of range: an index outside its axis).
//
// Only the tvm-ffi C++ API is used (the TVM wheel does not ship all headers its own
// runtime headers include). Tensors are created and copied through the runtime's
// global functions, so the same code path serves CPU and CUDA.
#include <dlfcn.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include "cli.h"
#include "npy.h"

namespace ffi = tvm::ffi;

namespace bscompile {
namespace {

constexpr int kFormatVersion = 2;   // runtime/artifact.py FORMAT_VERSION (reads 1 and 2)
constexpr int kPooledAllocator = 2;  // tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;   // -1 where the dim is symbolic
  std::vector<std::string> dim_names;  // the symbolic dims' names ("" for static dims)
  std::string dtype;
};

struct Manifest {
  std::string target_name, device, arch, module_file, tvm_version;
  std::vector<TensorSpec> inputs, outputs;
};

std::string ReadFile(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + what + " " + path + " (" + std::strerror(errno) + ")");
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// --- manifest.json (parsed with tvm-ffi's JSON reader) -------------------------------

ffi::Any Field(const ffi::json::Object& obj, const char* key, const char* where) {
  auto v = obj.Get(ffi::String(key));
  if (!v.has_value()) throw std::runtime_error(std::string("manifest.json: ") + where + " has no '" + key + "'");
  return *v;
}

std::string StrField(const ffi::json::Object& obj, const char* key, const char* where, const char* dflt = nullptr) {
  auto v = obj.Get(ffi::String(key));
  if (!v.has_value() && dflt) return dflt;
  auto s = Field(obj, key, where).try_cast<ffi::String>();
  if (!s.has_value()) throw std::runtime_error(std::string("manifest.json: ") + where + "." + key + " is not a string");
  return std::string(*s);
}

std::vector<TensorSpec> Specs(const ffi::json::Object& root, const char* key) {
  auto arr = Field(root, key, "the manifest").try_cast<ffi::json::Array>();
  if (!arr.has_value()) throw std::runtime_error(std::string("manifest.json: '") + key + "' is not a list");
  std::vector<TensorSpec> out;
  for (const ffi::Any& item : *arr) {
    auto obj = item.try_cast<ffi::json::Object>();
    if (!obj.has_value()) throw std::runtime_error(std::string("manifest.json: an entry of '") + key + "' is not an object");
    TensorSpec spec;
    spec.name = StrField(*obj, "name", key);
    spec.dtype = StrField(*obj, "dtype", key);
    auto shape = Field(*obj, "shape", key).try_cast<ffi::json::Array>();
    if (!shape.has_value()) throw std::runtime_error("manifest.json: shape of '" + spec.name + "' is not a list");
    for (const ffi::Any& d : *shape) {
      auto dim = d.try_cast<int64_t>();
      auto name = d.try_cast<ffi::String>();
      if (!dim.has_value() && !name.has_value()) {
        throw std::runtime_error("manifest.json: shape of '" + spec.name + "' holds neither sizes nor dim names");
      }
      spec.shape.push_back(dim.has_value() ? *dim : -1);
      spec.dim_names.push_back(dim.has_value() ? std::string() : std::string(*name));
    }
    out.push_back(spec);
  }
  return out;
}

Manifest LoadManifest(const std::string& bundle) {
  std::string path = bundle + "/manifest.json";
  std::string text = ReadFile(path, "manifest");
  ffi::String err;
  ffi::Any parsed = ffi::json::Parse(ffi::String(text), &err);
  if (!err.empty()) throw std::runtime_error(path + " is not valid JSON (" + std::string(err) + ")");
  auto root = parsed.try_cast<ffi::json::Object>();
  if (!root.has_value()) throw std::runtime_error(path + " is not a bscompile manifest");
  auto version = Field(*root, "format_version", "the manifest").try_cast<int64_t>();
  if (!version.has_value() || *version < 1 || *version > kFormatVersion) {
    throw std::runtime_error("artifact format " + (version ? std::to_string(*version) : std::string("?")) +
                             " is not supported (this runner reads format " + std::to_string(kFormatVersion) + ")");
  }
  Manifest m;
  m.target_name = StrField(*root, "target_name", "the manifest", "?");
  m.device = StrField(*root, "device", "the manifest", "cpu");
  m.arch = StrField(*root, "arch", "the manifest", "?");
  m.module_file = StrField(*root, "module_file", "the manifest", "module.so");
  m.tvm_version = StrField(*root, "tvm_version", "the manifest", "?");
  m.inputs = Specs(*root, "inputs");
  m.outputs = Specs(*root, "outputs");
  return m;
}

std::string DimsStr(const TensorSpec& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.shape.size(); ++i) {
    out += (i ? ", " : "") + (s.dim_names[i].empty() ? std::to_string(s.shape[i]) : s.dim_names[i]);
  }
  return out + "]";
}

std::string SpecStr(const TensorSpec& s) { return s.name + DimsStr(s) + ":" + s.dtype; }

// Whether `shape` fits `s`: the rank and static dims agree, symbolic dims are >= 1 and
// agree with the sizes other inputs gave the same name (recorded in `sizes`).
bool Fits(const TensorSpec& s, const std::vector<int64_t>& shape, std::map<std::string, int64_t>& sizes) {
  if (shape.size() != s.shape.size()) return false;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (s.dim_names[i].empty()) {
      if (shape[i] != s.shape[i]) return false;
    } else if (shape[i] < 1 || sizes.emplace(s.dim_names[i], shape[i]).first->second != shape[i]) {
      return false;
    }
  }
  return true;
}

std::string SpecList(const std::vector<TensorSpec>& specs) {
  std::string out;
  for (const TensorSpec& s : specs) out += (out.empty() ? "" : ", ") + SpecStr(s);
  return out;
}

// --- command line ---------------------------------------------------------------------

struct Options {
  std::string bundle;
  std::vector<std::pair<std::string, std::string>> inputs;  // name (may be empty), file
  std::string output_dir;
  bool help = false;
  bool info = false;
};

const char* kUsage =
    "usage: run --input NAME=FILE.npy [--input NAME=FILE.npy ...] --output DIR\n"
    "       run --info | --help\n"
    "Runs the bundled model on .npy inputs and writes DIR/<output name>.npy for each output\n"
    "(characters other than letters, digits, '.', '_' and '-' in a name become '_').\n"
    "A model with one input also takes --input FILE.npy. Set TVM_NUM_THREADS to limit threads\n"
    "(TVM_BIND_THREADS=1 pins them to cores; unpinned by default).\n";

Options ParseArgs(int argc, char** argv) {
  Options opt;
  if (argc < 2) throw UsageError("missing the bundle folder (start the runner through the bundle's `run`)");
  opt.bundle = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const std::string& flag) -> std::string {
      size_t eq = a.find('=');
      if (a.rfind(flag + "=", 0) == 0) return a.substr(eq + 1);
      if (i + 1 >= argc) throw UsageError(flag + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      opt.help = true;
    } else if (a == "--info") {
      opt.info = true;
    } else if (a == "--input" || a == "-i" || a.rfind("--input=", 0) == 0) {
      std::string v = value("--input");
      size_t eq = v.find('=');
      if (eq == std::string::npos) {
        opt.inputs.emplace_back("", v);
      } else {
        opt.inputs.emplace_back(v.substr(0, eq), v.substr(eq + 1));
      }
    } else if (a == "--output" || a == "-o" || a.rfind("--output=", 0) == 0) {
      opt.output_dir = value("--output");
    } else {
      throw UsageError("unknown argument '" + a + "'");
    }
  }
  return opt;
}

std::string SafeFileName(const std::string& name) {
  std::string out;
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
              c == '-';
    out.push_back(ok ? c : '_');
  }
  if (out.empty() || out[0] == '.') out = "_" + out;
  return out;
}

void MakeDirs(const std::string& dir) {
  std::string cur;
  std::stringstream ss(dir);
  std::string part;
  if (!dir.empty() && dir[0] == '/') cur = "/";
  while (std::getline(ss, part, '/')) {
    if (part.empty()) continue;
    cur += part + "/";
    if (mkdir(cur.c_str(), 0777) != 0 && errno != EEXIST) {
      throw std::runtime_error("cannot create output folder " + dir + " (" + std::strerror(errno) + ")");
    }
  }
  struct stat st;
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    throw std::runtime_error("output path " + dir + " is not a folder");
  }
}

// --- running ----------------------------------------------------------------------------

DLDevice DeviceFor(const Manifest& m) {
  if (m.device == "cpu") return DLDevice{kDLCPU, 0};
  if (m.device == "cuda") return DLDevice{kDLCUDA, 0};
  throw std::runtime_error("this runner does not support device '" + m.device + "'");
}

void LoadDeviceRuntime(const Manifest& m) {
  // CUDA modules need the CUDA device API and module loader, registered by
  // libtvm_runtime_cuda.so (the bundle ships it in lib/ for cuda manifests).
  if (m.device != "cuda") return;
  if (!dlopen("libtvm_runtime_cuda.so", RTLD_NOW | RTLD_GLOBAL)) {
    const char* why = dlerror();
    throw std::runtime_error(std::string("this model runs on CUDA and the CUDA runtime could not be loaded (") +
                             (why ? why : "?") + ")");
  }
}

ffi::Function Global(const char* name) {
  auto f = ffi::Function::GetGlobal(name);
  if (!f.has_value()) throw std::runtime_error(std::string("the TVM runtime lacks ") + name);
  return *f;
}

// Called by the range checks bscompile puts in front of every data-dependent index
// (passes/check_indices.py): the first out-of-range value raises an IndexError, which
// returns through the module instead of letting it read or write out of bounds.
void RegisterIndexError() {
  ffi::Function::SetGlobal(
      "bscompile.index_error",
      ffi::Function::FromTyped([](ffi::String prefix, int64_t value, int64_t lo, int64_t hi, ffi::String suffix) {
        throw ffi::Error("IndexError",
                         std::string(prefix) + std::to_string(value) + " outside [" + std::to_string(lo) + ", " +
                             std::to_string(hi) + ")" + std::string(suffix),
                         std::string());
      }),
      true);
}

// Inputs must be finite, as in CompiledModule.check_inputs: the generated code skips
// pruned zeros, so NaN and inf would not propagate as in dense arithmetic.
void CheckFinite(const std::string& name, const NpyArray& a) {
  auto scan = [&](auto tag) {
    using T = decltype(tag);
    size_t n = a.data.size() / sizeof(T);
    for (size_t i = 0; i < n; ++i) {
      T v;
      std::memcpy(&v, a.data.data() + i * sizeof(T), sizeof(T));
      if (!std::isfinite(v)) {
        throw std::runtime_error("input '" + name + "' holds " + std::to_string(v) + " at flat index " + std::to_string(i) +
                         "; inputs must be finite");
      }
    }
  };
  if (a.dtype == "float32") scan(float());
  if (a.dtype == "float64") scan(double());
}

int Run(const Options& opt) {
  if (opt.help) std::cout << kUsage << std::flush;
  Manifest m = LoadManifest(opt.bundle);
  if (opt.help || opt.info) {
    std::cout << "model: " << m.target_name << " (" << m.arch << ", " << m.device
              << ", TVM " << m.tvm_version << ")\n"
              << "inputs:  " << SpecList(m.inputs) << "\n"
              << "outputs: " << SpecList(m.outputs) << "\n";
    return 0;
  }
  if (opt.output_dir.empty()) throw UsageError("missing --output DIR");

  // Inputs: names, then each file's shape and dtype.
  std::map<std::string, std::string> files;
  for (const auto& [name_given, file] : opt.inputs) {
    std::string name = name_given;
    if (name.empty()) {
      if (m.inputs.size() != 1) {
        throw UsageError("give inputs as NAME=FILE.npy; the model's inputs are " + SpecList(m.inputs));
      }
      name = m.inputs[0].name;
    }
    if (!files.emplace(name, file).second) throw UsageError("input '" + name + "' is given twice");
  }
  std::vector<std::string> unknown, missing;
  for (const auto& kv : files) {
    bool known = false;
    for (const TensorSpec& s : m.inputs) known |= s.name == kv.first;
    if (!known) unknown.push_back(kv.first);
  }
  for (const TensorSpec& s : m.inputs) {
    if (!files.count(s.name)) missing.push_back(s.name);
  }
  if (!unknown.empty() || !missing.empty()) {
    std::string msg = "inputs do not match the model: ";
    auto join = [](const std::vector<std::string>& v) {
      std::string o;
      for (const auto& s : v) o += (o.empty() ? "'" : ", '") + s + "'";
      return o;
    };
    if (!unknown.empty()) msg += "unknown " + join(unknown) + "; ";
    if (!missing.empty()) msg += "missing " + join(missing) + "; ";
    throw std::runtime_error(msg + "expected " + SpecList(m.inputs));
  }
  std::vector<NpyArray> arrays;
  std::map<std::string, int64_t> sizes;  // symbolic dim -> the size the inputs give it
  for (const TensorSpec& s : m.inputs) {
    const std::string& file = files[s.name];
    NpyArray a = ReadNpy(file);
    if (!Fits(s, a.shape, sizes)) {
      throw std::runtime_error("input '" + s.name + "' (" + file + ") has shape " + ShapeStr(a.shape) + ", expected " +
                               DimsStr(s) + (sizes.empty() ? "" : " (symbolic dims >= 1, equal across inputs)"));
    }
    if (a.dtype != s.dtype) {
      throw std::runtime_error("input '" + s.name + "' (" + file + ") has dtype " + a.dtype + ", expected " + s.dtype);
    }
    CheckFinite(s.name, a);
    arrays.push_back(std::move(a));
  }
  MakeDirs(opt.output_dir);

  // The module and its Relax VM (as tvm.runtime.vm.VirtualMachine sets it up).
  DLDevice dev = DeviceFor(m);
  LoadDeviceRuntime(m);
  ffi::Module lib = ffi::Module::LoadFromFile(ffi::String(opt.bundle + "/" + m.module_file));
  auto load_exec = lib->GetFunction(ffi::String("vm_load_executable"), true);
  if (!load_exec.has_value()) throw std::runtime_error(m.module_file + " is not a Relax VM module");
  ffi::Module vm = (*load_exec)().cast<ffi::Module>();
  ffi::Function init = *vm->GetFunction(ffi::String("vm_initialization"), false);
  if (dev.device_type == kDLCPU) {
    init(static_cast<int>(kDLCPU), 0, kPooledAllocator);
  } else {  // the VM also needs the host CPU for shape computations
    init(static_cast<int>(dev.device_type), dev.device_id, kPooledAllocator, static_cast<int>(kDLCPU), 0,
         kPooledAllocator);
  }
  auto main_fn = vm->GetFunction(ffi::String("main"), false);
  if (!main_fn.has_value()) throw std::runtime_error(m.module_file + " has no 'main' function");

  ffi::Function alloc = Global("runtime.TVMTensorAllocWithScope");
  ffi::Function copy_from = Global("runtime.TVMTensorCopyFromBytes");
  ffi::Function copy_to = Global("runtime.TVMTensorCopyToBytes");
  std::vector<ffi::Any> args;
  for (size_t i = 0; i < arrays.size(); ++i) {
    const TensorSpec& s = m.inputs[i];
    ffi::Tensor t = alloc(ffi::Shape(arrays[i].shape), ffi::StringToDLDataType(ffi::String(s.dtype)), dev,
                          ffi::Optional<ffi::String>())
                        .cast<ffi::Tensor>();
    copy_from(t, static_cast<void*>(arrays[i].data.data()), static_cast<int64_t>(arrays[i].data.size()));
    args.emplace_back(t);
  }
  arrays.clear();
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  ffi::Any result;
  RegisterIndexError();
  main_fn->CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);

  std::vector<ffi::Tensor> outs;
  if (auto t = result.try_cast<ffi::Tensor>()) {
    outs.push_back(*t);
  } else if (auto tup = result.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *tup) {
      auto ot = item.try_cast<ffi::Tensor>();
      if (!ot.has_value()) throw std::runtime_error("the model returned a " + item.GetTypeKey() + ", not a tensor");
      outs.push_back(*ot);
    }
  } else {
    throw std::runtime_error("the model returned a " + result.GetTypeKey() + ", not tensors");
  }
  if (outs.size() != m.outputs.size()) {
    throw std::runtime_error("the model returned " + std::to_string(outs.size()) + " outputs; the manifest lists " +
                             std::to_string(m.outputs.size()));
  }
  for (size_t i = 0; i < outs.size(); ++i) {
    const ffi::Tensor& t = outs[i];
    std::string dtype = std::string(ffi::DLDataTypeToString(t.dtype()));
    std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
    int itemsize = NpyItemSize(dtype);
    if (!itemsize) throw std::runtime_error("output '" + m.outputs[i].name + "' has dtype " + dtype + ", which .npy cannot hold");
    size_t count = 1;
    for (int64_t d : shape) count *= static_cast<size_t>(d);
    std::vector<char> host(count * itemsize);
    copy_to(t, static_cast<void*>(host.data()), static_cast<int64_t>(host.size()));
    std::string path = opt.output_dir + "/" + SafeFileName(m.outputs[i].name) + ".npy";
    WriteNpy(path, dtype, shape, host.data(), host.size());
    std::cout << "wrote " << path << " " << ShapeStr(shape) << ":" << dtype << "\n";
  }
  return 0;
}

}  // namespace
}  // namespace bscompile

int main(int argc, char** argv) {
  bscompile::UnpinThreadPool();  // before TVM creates its pool
  return bscompile::GuardedMain([&] { return bscompile::Run(bscompile::ParseArgs(argc, argv)); }, "run --help");
}
