// What the deploy runner and the tuning server share: usage errors and a main() that
// turns any error into one line on stderr (exit 2 for usage errors, 1 otherwise).
#ifndef BSCOMPILE_DEPLOY_CLI_H_
#define BSCOMPILE_DEPLOY_CLI_H_

#include <cstdlib>
#include <exception>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>

#include <tvm/ffi/error.h>

namespace bscompile {

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The first non-empty line of a message.
inline std::string OneLine(const std::string& msg) {
  std::stringstream ss(msg);
  std::string line;
  while (std::getline(ss, line)) {
    if (line.find_first_not_of(" \t\r") != std::string::npos) return line;
  }
  return msg;
}

// Leaves TVM's pool threads unpinned unless the user chose (TVM_BIND_THREADS): TVM pins its
// workers to cores 1.. but not the caller, which the OS may run on a worker's core; a parallel
// kernel then runs its halves one after the other (see runtime/threads.py). The runner and the
// RPC server call it first.
inline void UnpinThreadPool() { setenv("TVM_BIND_THREADS", "0", /*overwrite=*/0); }

// Runs body() and reports what it throws; `help` names the help command for usage errors.
template <typename Body>
int GuardedMain(Body&& body, const char* help) {
  try {
    return body();
  } catch (const UsageError& e) {
    std::cerr << "error: " << e.what() << " (see " << help << ")\n";
    return 2;
  } catch (const tvm::ffi::Error& e) {
    if (e.kind() == "IndexError") {  // input data out of range: a user error, like a wrong shape
      std::cerr << "error: " << OneLine(e.message()) << "\n";
      return 2;
    }
    std::cerr << "error: " << e.kind() << ": " << OneLine(e.message()) << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << OneLine(e.what()) << "\n";
  }
  return 1;
}

}  // namespace bscompile

#endif  // BSCOMPILE_DEPLOY_CLI_H_
