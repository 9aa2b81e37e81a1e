# Included by the consumers that build r1 as a subproject: r1's developer-only parts
# must default to OFF there, or every consumer would build r1's tests and examples.
foreach(option IN ITEMS R1_BUILD_TESTS R1_BUILD_EXAMPLES R1_BUILD_BENCH R1_INSTALL R1_NATIVE)
  if(${option})
    message(FATAL_ERROR "${option} is ON although r1 is not the top-level project")
  endif()
endforeach()
