// Argument checks for the C++ core.
//
// Contract: `check(ok, name, expected, got)` throws std::invalid_argument with the message
// "<name>: expected <expected>, got <got>" when `ok` is false; `check_index` throws std::out_of_range with
// the same layout. pybind11 maps them to ValueError and IndexError. The message is built only on failure.
// Nothing here exits or aborts.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace lenvm {

template <class Expected, class Got>
std::string describe_failure(const char* name, const Expected& expected, const Got& got) {
    std::ostringstream msg;
    msg << name << ": expected " << expected << ", got " << got;
    return msg.str();
}

template <class Expected, class Got>
void check(bool ok, const char* name, const Expected& expected, const Got& got) {
    if (!ok) throw std::invalid_argument(describe_failure(name, expected, got));
}

template <class Expected, class Got>
void check_index(bool ok, const char* name, const Expected& expected, const Got& got) {
    if (!ok) throw std::out_of_range(describe_failure(name, expected, got));
}

}  // namespace lenvm
