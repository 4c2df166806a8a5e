// Dtype dispatch shared by the CPU and CUDA kernel files: the fused ops take
// float32, float16 and bfloat16 (state is always kept in float32).
#pragma once
#include <ATen/Dispatch.h>

#define SPK_DISPATCH_FLOATS(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                             \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
