// Minimal .npy (NumPy format 1.0-3.0) reader and writer for the bscompile deploy runner.
//
// Reads C-ordered little-endian arrays of the plain numeric dtypes (bool, int8-64,
// uint8-64, float16/32/64) and writes format 1.0. Errors are std::runtime_error with a
// one-line message naming the file.
#ifndef BSCOMPILE_DEPLOY_NPY_H_
#define BSCOMPILE_DEPLOY_NPY_H_

#include <cstdint>
#include <string>
#include <vector>

namespace bscompile {

struct NpyArray {
  std::string dtype;            // TVM/NumPy dtype name: "float32", "int64", "bool", ...
  std::vector<int64_t> shape;   // C order
  std::vector<char> data;       // raw little-endian bytes, C order
};

// NumPy descr ("<f4", "|b1", ...) for a dtype name; "" when the dtype has no .npy form here.
std::string NpyDescr(const std::string& dtype);

// Bytes per element of a dtype name (0 when unknown).
int NpyItemSize(const std::string& dtype);

// Read a whole .npy file. Throws std::runtime_error("FILE: what is wrong").
NpyArray ReadNpy(const std::string& path);

// Write `data` (nbytes bytes, C order) as a .npy file, atomically (temp file + rename).
void WriteNpy(const std::string& path, const std::string& dtype, const std::vector<int64_t>& shape,
              const void* data, size_t nbytes);

// "[2, 3]"
std::string ShapeStr(const std::vector<int64_t>& shape);

}  // namespace bscompile

#endif  // BSCOMPILE_DEPLOY_NPY_H_
