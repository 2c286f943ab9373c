# Included right after find_package(Torch), by this project and by the installed
# package config (so a consumer gets the same fix-ups).
#
# The LibTorch inside PyTorch's wheel finds its CUDA libraries (NCCL, cuBLAS,
# cuDNN, ...) in the nvidia-* wheels beside it through $ORIGIN run paths. The
# linker, resolving libtorch_cuda.so's own dependencies when a program links,
# does not expand those, and takes an older system copy instead where the CUDA
# toolkit installed one (undefined references to newer NCCL symbols). Point it
# at the wheels' libraries; at run time the run paths find them as before.
if(TARGET torch AND DEFINED TORCH_INSTALL_PREFIX)
  file(GLOB _d9d_peft_wheel_libs LIST_DIRECTORIES true "${TORCH_INSTALL_PREFIX}/../nvidia/*/lib")
  foreach(_d9d_peft_dir IN LISTS _d9d_peft_wheel_libs)
    get_filename_component(_d9d_peft_dir "${_d9d_peft_dir}" REALPATH)
    set_property(TARGET torch APPEND PROPERTY INTERFACE_LINK_OPTIONS "LINKER:-rpath-link,${_d9d_peft_dir}")
  endforeach()
  unset(_d9d_peft_wheel_libs)
  unset(_d9d_peft_dir)
endif()
