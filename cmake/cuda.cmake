# CUDA kernels join the same module. The runtime is linked statically so the wheel still imports on a
# machine with no GPU or driver: the CUDA ops then report "no CUDA device" and the CPU ops run.
# sm_80 and sm_90 machine code plus sm_90 PTX for newer GPUs, unless the builder chose (-DCMAKE_CUDA_ARCHITECTURES
# before the language is enabled; afterwards CMake has filled in the compiler's default).
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
  set(CMAKE_CUDA_ARCHITECTURES "80-real;90-real;90-virtual")
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
# csrc/cuda holds only kernels; their pybind11 bindings are in csrc/auvcore.cpp under AUVCORE_WITH_CUDA (built by
# the host compiler, without nvcc's front end in the way of pybind11's templates).
target_sources(_C PRIVATE ${AUVCORE_CUDA_SOURCES})
target_compile_definitions(_C PRIVATE AUVCORE_WITH_CUDA=1)
# IEEE division and square root, no flush to zero (nvcc defaults, spelled out): S is compared with a float64
# reference at 1e-4 and the bisection relies on exact comparisons near 0.
target_compile_options(_C PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 -prec-div=true -prec-sqrt=true -ftz=false>)
if(AUVCORE_CUDA_VERBOSE_PTXAS)
  target_compile_options(_C PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xptxas=-v>)
endif()
target_link_libraries(_C PRIVATE CUDA::cudart_static)
# _C was created before CUDA was enabled, so its CUDA properties must be set by hand.
set_target_properties(_C PROPERTIES CUDA_RUNTIME_LIBRARY Static CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}"
                                    CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON)
message(STATUS "auvcore: building CUDA kernels for ${CMAKE_CUDA_ARCHITECTURES}")
