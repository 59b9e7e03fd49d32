# CUDA kernels join the same module. The runtime is linked statically so the wheel still imports on a
# machine with no GPU or driver: the CUDA ops then report "no CUDA device" and the CPU ops run.
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "52")
  set(CMAKE_CUDA_ARCHITECTURES "80-real;90-real;90-virtual")
endif()
target_sources(_C PRIVATE ${AUVCORE_CUDA_SOURCES})
target_compile_definitions(_C PRIVATE AUVCORE_WITH_CUDA=1)
target_compile_options(_C PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 --use_fast_math=false>)
target_link_libraries(_C PRIVATE CUDA::cudart_static)
set_target_properties(_C PROPERTIES CUDA_RUNTIME_LIBRARY Static)
message(STATUS "auvcore: building CUDA kernels for ${CMAKE_CUDA_ARCHITECTURES}")
