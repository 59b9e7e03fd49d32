// A strided view of memory owned by the caller (a torch tensor or a numpy array).
// The extension never links libtorch: Python hands over pointer, dtype, shape and strides (in elements),
// and the kernels read the caller's memory in place.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace auvcore {

enum class DType : int { F16 = 0, BF16 = 1, F32 = 2, F64 = 3, I8 = 4, U8 = 5, I16 = 6, I32 = 7, I64 = 8 };

inline bool is_floating(DType t) { return t == DType::F16 || t == DType::BF16 || t == DType::F32 || t == DType::F64; }

// Where a view's memory lives: kHost, or the index of the CUDA device it was allocated on.
constexpr int kHost = -1;

struct ArrayView {
  std::uintptr_t ptr = 0;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements, may be any sign
  int device = kHost;

  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  const void* data() const { return reinterpret_cast<const void*>(ptr); }
};

// Bad arguments surface in Python as ValueError with the argument named.
struct ArgumentError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw ArgumentError(msg);
}

inline std::string memory_name(int device) {
  return device == kHost ? std::string("host memory") : "memory of CUDA device " + std::to_string(device);
}

// A kernel reads or writes a view only where it runs: host memory for the CPU ops, the op's device for the
// CUDA ops. A view on the wrong side is an ArgumentError naming it, never a dereference of a foreign pointer.
inline void require_on(const ArrayView& v, int device, const char* name) {
  require(v.device == device, std::string(name) + ": expected " + memory_name(device) + ", got " +
                                  memory_name(v.device));
}

// Row-major contiguous (dimensions of size 1 may have any stride).
inline bool is_contiguous(const ArrayView& v) {
  int64_t stride = 1;
  for (int64_t d = v.dim() - 1; d >= 0; --d) {
    if (v.shape[d] > 1 && v.strides[d] != stride) return false;
    stride *= v.shape[d];
  }
  return true;
}

// A buffer the caller allocated for an op (an output, or what an earlier op wrote), checked before anything
// is read or written: its dtype, a contiguous row-major layout, the exact shape the op needs and the memory
// it lives in (`device`: kHost for the CPU ops, the CUDA device for the CUDA ops). A wrong size is an
// ArgumentError naming the buffer, never a write past its end. An empty view (pointer 0) means "not wanted"
// where `optional`, and gives nullptr.
template <typename T>
T* buffer(const ArrayView& v, DType dtype, const std::vector<int64_t>& shape, const char* name, bool optional = false,
          int device = kHost) {
  if (v.ptr == 0) {
    require(optional, std::string(name) + ": this buffer is required (got a null pointer)");
    return nullptr;
  }
  auto str = [](const std::vector<int64_t>& s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
  };
  require(v.dtype == dtype, std::string(name) + ": wrong dtype for this buffer");
  require(v.shape == shape, std::string(name) + ": expected shape " + str(shape) + ", got " + str(v.shape));
  require(is_contiguous(v), std::string(name) + ": expected a contiguous buffer");
  require_on(v, device, name);
  return reinterpret_cast<T*>(v.ptr);
}

// IEEE half and bfloat16 to float, without depending on compiler extensions.
inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; --exp; }
      man &= 0x3ffu;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Read element `off` (in elements) of a floating array as double.
inline double load_as_double(const void* base, DType t, int64_t off) {
  switch (t) {
    case DType::F64: return static_cast<const double*>(base)[off];
    case DType::F32: return static_cast<const float*>(base)[off];
    case DType::F16: return half_to_float(static_cast<const uint16_t*>(base)[off]);
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(base)[off]);
    default: throw ArgumentError("expected a floating dtype");
  }
}

// Read element `off` of an integer array as int64.
inline int64_t load_as_int(const void* base, DType t, int64_t off) {
  switch (t) {
    case DType::I64: return static_cast<const int64_t*>(base)[off];
    case DType::I32: return static_cast<const int32_t*>(base)[off];
    case DType::I16: return static_cast<const int16_t*>(base)[off];
    case DType::I8: return static_cast<const int8_t*>(base)[off];
    case DType::U8: return static_cast<const uint8_t*>(base)[off];
    default: throw ArgumentError("expected an integer dtype");
  }
}

}  // namespace auvcore
