# D9D_PEFT_SANITIZE: compile and link every target of this project with the
# listed sanitizers (-DD9D_PEFT_SANITIZE=address,undefined, as -fsanitize=
# takes them), gcc or clang. scripts/test.sh builds the whole project so in
# build-sanitize/, with clang, and runs the full test suite there.
#
# Only this project's code is instrumented: LibTorch, GoogleTest and the C++
# runtime are used as installed. Meant for Debian's LibTorch 1.13 (CPU); the
# 2.x wheel build is not sanitized: its CUDA libraries (several GB, loaded at
# start-up) would make every test process slow and large under ASan, and what
# is instrumented here, this project's code, is the same for both.
#
# Not part of the installed package: a consumer of a sanitized d9d_peft
# archive links with the same -fsanitize= flags itself.
if(D9D_PEFT_BUILD_FUZZERS AND NOT D9D_PEFT_SANITIZE)
  # libFuzzer targets find bugs through the sanitizers.
  set(D9D_PEFT_SANITIZE address,undefined)
endif()

if(D9D_PEFT_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "D9D_PEFT_SANITIZE needs gcc or clang, not ${CMAKE_CXX_COMPILER_ID}")
  endif()
  string(REPLACE ";" "," D9D_PEFT_SANITIZE "${D9D_PEFT_SANITIZE}")
  message(STATUS "d9d-peft: every target compiled and linked with -fsanitize=${D9D_PEFT_SANITIZE}")
  # Frame pointers: whole stack traces from ASan's fast unwinder. Line tables
  # only: file:line in every report, at a fraction of -g's compile time and size.
  add_compile_options(-fsanitize=${D9D_PEFT_SANITIZE} -fno-omit-frame-pointer
                      $<IF:$<CXX_COMPILER_ID:Clang>,-gline-tables-only,-g1>)
  add_link_options(-fsanitize=${D9D_PEFT_SANITIZE})
  string(REPLACE "," ";" _d9d_peft_sanitizers "${D9D_PEFT_SANITIZE}")
  if("undefined" IN_LIST _d9d_peft_sanitizers)
    # A UBSan report aborts the process, failing its test, instead of a line
    # in the log that a passing test would hide.
    add_compile_options(-fno-sanitize-recover=undefined)
  endif()
  unset(_d9d_peft_sanitizers)
endif()

# A sanitizer report fails its test even where the exit status would not: a
# test that expects a program to fail (`exit=1`, `exit=[1-9]...`) would
# otherwise pass when a report ends it with ASan's exit status 1. Every report
# ends with a SUMMARY line. Each list file that adds tests calls
# d9d_peft_fail_tests_on_sanitizer_reports() last (CMake sets test properties
# per directory); the discovered GoogleTest cases get the property through
# gtest_discover_tests' PROPERTIES.
set(D9D_PEFT_SANITIZER_TEST_PROPERTIES)
if(D9D_PEFT_SANITIZE)
  set(D9D_PEFT_SANITIZER_TEST_PROPERTIES FAIL_REGULAR_EXPRESSION "SUMMARY: [A-Za-z]+Sanitizer")
endif()

function(d9d_peft_fail_tests_on_sanitizer_reports)
  get_property(tests DIRECTORY PROPERTY TESTS)
  if(D9D_PEFT_SANITIZER_TEST_PROPERTIES AND tests)
    set_tests_properties(${tests} PROPERTIES ${D9D_PEFT_SANITIZER_TEST_PROPERTIES})
  endif()
endfunction()
