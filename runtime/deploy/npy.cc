// Minimal .npy reader/writer: see npy.h.
#include "npy.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>

namespace bscompile {
namespace {

struct DTypeInfo {
  const char* name;
  const char* descr;  // as NumPy writes it
  int itemsize;
};

const DTypeInfo kDTypes[] = {
    {"float32", "<f4", 4}, {"float64", "<f8", 8}, {"float16", "<f2", 2}, {"int8", "|i1", 1},
    {"int16", "<i2", 2},   {"int32", "<i4", 4},   {"int64", "<i8", 8},   {"uint8", "|u1", 1},
    {"uint16", "<u2", 2},  {"uint32", "<u4", 4},  {"uint64", "<u8", 8},  {"bool", "|b1", 1},
};

[[noreturn]] void Fail(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": " + what);
}

// The text after `'key':` in a NumPy header dict, or npos.
size_t ValueAfterKey(const std::string& header, const std::string& key) {
  for (const char* quote : {"'", "\""}) {
    size_t pos = header.find(std::string(quote) + key + quote);
    if (pos == std::string::npos) continue;
    pos = header.find(':', pos + key.size() + 2);
    if (pos == std::string::npos) return pos;
    ++pos;
    while (pos < header.size() && (header[pos] == ' ' || header[pos] == '\t')) ++pos;
    return pos;
  }
  return std::string::npos;
}

std::string DTypeFromDescr(const std::string& path, const std::string& descr) {
  if (descr.size() < 3) Fail(path, "unsupported dtype descr '" + descr + "'");
  char order = descr[0];
  std::string code = descr.substr(1);
  if (order == '>' && code != "i1" && code != "u1" && code != "b1") {
    Fail(path, "big-endian data ('" + descr + "') is not supported; save it little-endian, e.g. a.astype('<" +
                   code + "')");
  }
  if (order != '<' && order != '|' && order != '=' && order != '>') {
    Fail(path, "unsupported dtype descr '" + descr + "'");
  }
  for (const DTypeInfo& t : kDTypes) {
    if (code == std::string(t.descr).substr(1)) return t.name;
  }
  Fail(path, "unsupported dtype '" + descr + "' (supported: bool, int8-64, uint8-64, float16/32/64)");
}

}  // namespace

std::string NpyDescr(const std::string& dtype) {
  for (const DTypeInfo& t : kDTypes) {
    if (dtype == t.name) return t.descr;
  }
  return "";
}

int NpyItemSize(const std::string& dtype) {
  for (const DTypeInfo& t : kDTypes) {
    if (dtype == t.name) return t.itemsize;
  }
  return 0;
}

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

NpyArray ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail(path, std::string("cannot open (") + std::strerror(errno) + ")");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) Fail(path, "not a .npy file (bad magic)");
  int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len, offset;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) Fail(path, "truncated .npy header");
    header_len = 0;
    for (int i = 0; i < 4; ++i) header_len |= static_cast<size_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    offset = 12;
  } else {
    Fail(path, "unsupported .npy format version " + std::to_string(major));
  }
  if (bytes.size() < offset + header_len) Fail(path, "truncated .npy header");
  std::string header = bytes.substr(offset, header_len);
  offset += header_len;

  NpyArray arr;
  size_t pos = ValueAfterKey(header, "descr");
  if (pos == std::string::npos) Fail(path, "invalid .npy header (no 'descr')");
  if (header[pos] != '\'' && header[pos] != '"') Fail(path, "structured dtypes are not supported");
  size_t end = header.find(header[pos], pos + 1);
  if (end == std::string::npos) Fail(path, "invalid .npy header (descr)");
  arr.dtype = DTypeFromDescr(path, header.substr(pos + 1, end - pos - 1));

  pos = ValueAfterKey(header, "fortran_order");
  if (pos == std::string::npos) Fail(path, "invalid .npy header (no 'fortran_order')");
  if (header.compare(pos, 4, "True") == 0) {
    Fail(path, "Fortran-ordered arrays are not supported; save np.ascontiguousarray(a)");
  }

  pos = ValueAfterKey(header, "shape");
  if (pos == std::string::npos || header[pos] != '(') Fail(path, "invalid .npy header (no 'shape')");
  end = header.find(')', pos);
  if (end == std::string::npos) Fail(path, "invalid .npy header (shape)");
  std::string dims = header.substr(pos + 1, end - pos - 1);
  size_t i = 0;
  while (i < dims.size()) {
    while (i < dims.size() && (dims[i] == ' ' || dims[i] == ',')) ++i;
    if (i >= dims.size()) break;
    size_t j = i;
    while (j < dims.size() && dims[j] >= '0' && dims[j] <= '9') ++j;
    if (j == i) Fail(path, "invalid .npy header (shape '" + dims + "')");
    arr.shape.push_back(std::stoll(dims.substr(i, j - i)));
    i = j;
  }

  size_t count = 1;
  for (int64_t d : arr.shape) count *= static_cast<size_t>(d);
  size_t nbytes = count * NpyItemSize(arr.dtype);
  size_t have = bytes.size() - offset;
  if (have != nbytes) {
    Fail(path, (have < nbytes ? "truncated: " : "has trailing bytes: ") + std::to_string(have) +
                   " bytes of data, expected " + std::to_string(nbytes) + " for " + arr.dtype + ShapeStr(arr.shape));
  }
  arr.data.assign(bytes.begin() + offset, bytes.end());
  return arr;
}

void WriteNpy(const std::string& path, const std::string& dtype, const std::vector<int64_t>& shape,
              const void* data, size_t nbytes) {
  std::string descr = NpyDescr(dtype);
  if (descr.empty()) Fail(path, "cannot write dtype " + dtype + " as .npy");
  std::ostringstream dict;
  dict << "{'descr': '" << descr << "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < shape.size(); ++i) dict << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) dict << ",";
  dict << "), }";
  std::string header = dict.str();
  size_t total = 10 + header.size() + 1;  // magic + version + len, header, '\n'
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');

  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) Fail(path, std::string("cannot write (") + std::strerror(errno) + ")");
    const char preamble[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
    out.write(preamble, 8);
    char len[2] = {static_cast<char>(header.size() & 0xff), static_cast<char>((header.size() >> 8) & 0xff)};
    out.write(len, 2);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
    out.close();
    if (!out) {
      std::remove(tmp.c_str());
      Fail(path, "write failed (disk full?)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    Fail(path, std::string("cannot write (") + std::strerror(errno) + ")");
  }
}

}  // namespace bscompile
