// bscompile-rpc-server: a TVM RPC server for tuning on the device itself.
//
//   bscompile-rpc-server [--stdio]                          one session on stdin/stdout (`ssh -T board ...`)
//   bscompile-rpc-server --port P [--host ADDR]             TCP sessions, one at a time
//   bscompile-rpc-server --tracker HOST:PORT --key NAME     TCP sessions handed out by a TVM RPC tracker
//   bscompile-rpc-server --info                             print what `bscompile.rpc.info` reports
//
// It speaks TVM's RPC protocol (the runtime's `rpc.ServerLoop`), the TCP handshake of
// tvm.rpc.server and the client side of tvm.rpc.tracker's protocol, so any TVM 0.27
// client (tvm.rpc.connect, TrackerSession.request, PopenSession) can use it. Only the
// tvm-ffi C++ API is used: the TVM wheel ships no apps/cpp_rpc and not all the headers
// its own RPC sources include.
//
// SECURITY: a session uploads shared libraries and runs them. Whoever can open a
// session runs code as this user. The default is stdio (the transport is ssh, with its
// authentication); TCP binds 127.0.0.1 unless --host says otherwise. Bind another
// address only on a network where everyone who can reach the port may run code here.
//
// Each session runs in a forked child in its own temporary folder (removed afterwards),
// is killed after --session-timeout seconds, and a client can arm a per-call watchdog
// (`bscompile.rpc.watchdog(seconds)`): a candidate kernel that crashes or hangs ends its
// session, not the server. Logs go to stderr; in --stdio mode stdout carries the
// protocol only (anything a kernel prints to stdout is sent to stderr).
#include <dirent.h>
#include <fcntl.h>
#include <gnu/libc-version.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <algorithm>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include "cli.h"

#ifndef BSCOMPILE_VERSION
#define BSCOMPILE_VERSION "?"
#endif
#ifndef BSCOMPILE_TVM_VERSION
#define BSCOMPILE_TVM_VERSION "?"
#endif
#ifndef BSCOMPILE_TVM_FFI_VERSION
#define BSCOMPILE_TVM_FFI_VERSION "?"
#endif

namespace ffi = tvm::ffi;

namespace bscompile {
namespace {

// tvm/rpc/base.py
constexpr int32_t kRPCMagic = 0xFF271;
constexpr int32_t kRPCTrackerMagic = 0x2F271;
constexpr int32_t kRPCCodeSuccess = kRPCMagic + 0;
constexpr int32_t kRPCCodeMismatch = kRPCMagic + 2;
enum TrackerCode { kFail = -1, kSuccess = 0, kPut = 3, kUpdateInfo = 5, kGetPendingMatchKeys = 7 };

struct Options {
  bool stdio = false, tcp = false, info = false, help = false, quiet = false;
  std::string host = "127.0.0.1";
  int port = 9090;
  std::string tracker_host, key, custom_addr;
  int tracker_port = 0;
  double session_timeout = 600;  // seconds, 0 = none
  double idle_timeout = 0;       // TCP: exit after this long without a session, 0 = never
  int max_sessions = 0;          // TCP: exit after this many sessions, 0 = never
  std::string work_dir;
};

const char* kUsage =
    "usage: bscompile-rpc-server [--stdio]                       serve one session on stdin/stdout (default)\n"
    "       bscompile-rpc-server --port P [--host ADDR]          serve TCP sessions (P=0: any free port)\n"
    "       bscompile-rpc-server --tracker HOST:PORT --key NAME  [--port P --host ADDR --custom-addr ADDR]\n"
    "       bscompile-rpc-server --info\n"
    "options: --session-timeout S (default 600, 0 = none)  --idle-timeout S  --max-sessions N\n"
    "         --work-dir DIR (default $TMPDIR or /tmp)  --quiet\n"
    "A session runs what its client uploads: TCP binds 127.0.0.1 unless --host says otherwise.\n"
    "With --tracker the server also binds 127.0.0.1 by default; on a fleet give --host 0.0.0.0 (or the\n"
    "board's address) on a trusted network only.\n";

bool g_quiet = false;
bool g_in_session = false;  // true in a session's forked child
// Set by SIGTERM / SIGINT / SIGHUP: end the current session (killing its child and
// removing its folder) and exit, instead of leaving both behind.
volatile sig_atomic_t g_stop = 0;

void OnStopSignal(int) { g_stop = 1; }

void Log(const std::string& msg) {
  if (!g_quiet) std::cerr << "bscompile-rpc-server[" << getpid() << "]: " << msg << std::endl;
}

double ParseSeconds(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  double d = std::strtod(v.c_str(), &end);
  if (v.empty() || *end || d < 0) throw UsageError(flag + " needs a number of seconds, got '" + v + "'");
  return d;
}

int ParseInt(const std::string& flag, const std::string& v, int lo, int hi) {
  char* end = nullptr;
  long n = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end || n < lo || n > hi) throw UsageError(flag + " needs an integer in [" + std::to_string(lo) +
                                                              ", " + std::to_string(hi) + "], got '" + v + "'");
  return static_cast<int>(n);
}

Options ParseArgs(int argc, char** argv) {
  Options o;
  bool port_given = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const std::string& flag) -> std::string {
      if (a.rfind(flag + "=", 0) == 0) return a.substr(flag.size() + 1);
      if (i + 1 >= argc) throw UsageError(flag + " needs a value");
      return argv[++i];
    };
    auto is = [&](const char* flag) { return a == flag || a.rfind(std::string(flag) + "=", 0) == 0; };
    if (a == "-h" || a == "--help") {
      o.help = true;
    } else if (a == "--info") {
      o.info = true;
    } else if (a == "--stdio") {
      o.stdio = true;
    } else if (a == "--quiet" || a == "-q") {
      o.quiet = true;
    } else if (is("--host")) {
      o.host = value("--host");
      o.tcp = true;
    } else if (is("--port")) {
      o.port = ParseInt("--port", value("--port"), 0, 65535);
      o.tcp = port_given = true;
    } else if (is("--tracker")) {
      std::string t = value("--tracker");
      size_t colon = t.rfind(':');
      if (colon == std::string::npos || colon == 0) throw UsageError("--tracker needs HOST:PORT, got '" + t + "'");
      o.tracker_host = t.substr(0, colon);
      o.tracker_port = ParseInt("--tracker port", t.substr(colon + 1), 1, 65535);
      o.tcp = true;
    } else if (is("--key")) {
      o.key = value("--key");
    } else if (is("--custom-addr")) {
      o.custom_addr = value("--custom-addr");
    } else if (is("--session-timeout")) {
      o.session_timeout = ParseSeconds("--session-timeout", value("--session-timeout"));
    } else if (is("--idle-timeout")) {
      o.idle_timeout = ParseSeconds("--idle-timeout", value("--idle-timeout"));
    } else if (is("--max-sessions")) {
      o.max_sessions = ParseInt("--max-sessions", value("--max-sessions"), 0, 1 << 30);
    } else if (is("--work-dir")) {
      o.work_dir = value("--work-dir");
    } else {
      throw UsageError("unknown argument '" + a + "'");
    }
  }
  if (o.stdio && o.tcp) throw UsageError("--stdio serves on stdin/stdout: it takes no --host/--port/--tracker");
  if (!o.tracker_host.empty() && o.key.empty()) throw UsageError("--tracker needs --key NAME (the device key)");
  if (!o.tracker_host.empty() && !port_given) o.port = 0;  // the tracker tells clients the port
  if (o.key.find_first_of(" \t\n") != std::string::npos) throw UsageError("--key must not contain spaces");
  if (!o.tcp) o.stdio = true;
  if (o.work_dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    o.work_dir = tmp && *tmp ? tmp : "/tmp";
  }
  g_quiet = o.quiet;
  return o;
}

// --- device information -------------------------------------------------------------

std::string Trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

std::string ReadSmallFile(const char* path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return Trim(std::string(s.c_str()));  // device-tree strings end with NUL
}

// Arm's "CPU part" numbers of common cores (implementer 0x41); others are reported raw.
std::string ArmCore(const std::string& part) {
  static const std::map<std::string, std::string> kParts = {
      {"0xd03", "Cortex-A53"}, {"0xd04", "Cortex-A35"}, {"0xd05", "Cortex-A55"}, {"0xd07", "Cortex-A57"},
      {"0xd08", "Cortex-A72"}, {"0xd09", "Cortex-A73"}, {"0xd0a", "Cortex-A75"}, {"0xd0b", "Cortex-A76"},
      {"0xd0c", "Neoverse-N1"}, {"0xd0d", "Cortex-A77"}, {"0xd0e", "Cortex-A76AE"}, {"0xd40", "Neoverse-V1"},
      {"0xd41", "Cortex-A78"}, {"0xd42", "Cortex-A78AE"}, {"0xd44", "Cortex-X1"}, {"0xd46", "Cortex-A510"},
      {"0xd47", "Cortex-A710"}, {"0xd48", "Cortex-X2"}, {"0xd49", "Neoverse-N2"}, {"0xd4b", "Cortex-A78C"},
      {"0xd4f", "Neoverse-V2"}, {"0xd80", "Cortex-A520"}, {"0xd81", "Cortex-A720"}, {"0xd82", "Cortex-X4"}};
  auto it = kParts.find(part);
  return it == kParts.end() ? "" : it->second;
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line, model, implementer, part;
  while (std::getline(in, line)) {
    size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string k = Trim(line.substr(0, colon)), v = Trim(line.substr(colon + 1));
    if (model.empty() && (k == "model name" || k == "Model" || k == "cpu model")) model = v;
    if (implementer.empty() && k == "CPU implementer") implementer = v;
    if (part.empty() && k == "CPU part") part = v;
  }
  if (!model.empty()) return model;
  if (!part.empty()) {
    std::string core = implementer == "0x41" ? ArmCore(part) : "";
    return core.empty() ? "implementer " + implementer + " part " + part : core;
  }
  return "unknown";
}

std::string InfoJson() {
  struct utsname u;
  uname(&u);
  ffi::Map<ffi::Any, ffi::Any> info;
  auto put = [&](const char* k, ffi::Any v) { info.Set(ffi::String(k), v); };
  put("server", ffi::String("bscompile-rpc-server"));
  put("bscompile", ffi::String(BSCOMPILE_VERSION));
  put("tvm", ffi::String(BSCOMPILE_TVM_VERSION));
  put("tvm_ffi", ffi::String(BSCOMPILE_TVM_FFI_VERSION));
  put("arch", ffi::String(u.machine));
  put("os", ffi::String(std::string(u.sysname) + " " + u.release));
  put("hostname", ffi::String(u.nodename));
  // the server process (sessions are its forked children): tells the servers of one host apart
  put("server_pid", static_cast<int64_t>(g_in_session ? getppid() : getpid()));
  put("glibc", ffi::String(gnu_get_libc_version()));
  put("cpu_model", ffi::String(CpuModel()));
  std::string board = ReadSmallFile("/proc/device-tree/model");
  if (!board.empty()) put("board", ffi::String(board));
  put("cpu_count", static_cast<int64_t>(std::thread::hardware_concurrency()));
  const char* nt = std::getenv("TVM_NUM_THREADS");
  put("tvm_num_threads_env", nt ? ffi::Any(ffi::String(nt)) : ffi::Any());
  if (auto f = ffi::Function::GetGlobal("runtime.NumThreads")) put("threads", (*f)().cast<int64_t>());
  put("cache_flush", ffi::Function::GetGlobal("cache_flush_cpu_non_first_arg").has_value());
  return std::string(ffi::json::Stringify(info));
}

// --- session environment ------------------------------------------------------------

int RemoveEntry(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return -1;
  if (S_ISDIR(st.st_mode)) {
    if (DIR* d = opendir(path.c_str())) {
      while (dirent* e = readdir(d)) {
        std::string n = e->d_name;
        if (n != "." && n != "..") RemoveEntry(path + "/" + n);
      }
      closedir(d);
    }
    return rmdir(path.c_str());
  }
  return unlink(path.c_str());
}

std::string Seconds(double s) {
  std::ostringstream os;
  os << s << " s";
  return os.str();
}

std::string MakeWorkDir(const std::string& base) {
  std::string tmpl = base + "/bscompile-rpc-XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) {
    throw std::runtime_error("cannot create a session folder in " + base + " (" + std::strerror(errno) + ")");
  }
  return std::string(buf.data());
}

// The session's own deadline (steady clock, seconds; 0 = none): a watchdog never
// outlives it, and disarming a watchdog re-arms it.
double g_session_deadline = 0;

double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

unsigned ArmAlarm(double seconds) {
  double left = g_session_deadline > 0 ? std::max(1.0, g_session_deadline - Now()) : 0;
  double s = seconds > 0 ? (left > 0 ? std::min(seconds, left) : seconds) : left;
  unsigned whole = s > 0 ? static_cast<unsigned>(s + 0.999) : 0u;
  alarm(whole);
  return whole;
}

// The globals tvm.rpc's server-side calls expect (python/tvm/rpc/server.py registers the
// same ones): the runtime's tvm.rpc.server.upload/download/remove resolve names through
// `workpath`, and RPCSession.load_module calls `load_module`.
void RegisterSessionGlobals(const std::string& dir) {
  auto path_of = [dir](const ffi::String& name) -> std::string {
    std::string n = name;
    if (n.empty() || n[0] == '/' || n.find("..") != std::string::npos) {
      throw std::runtime_error("file names are relative to the session folder: '" + n + "'");
    }
    return dir + "/" + n;
  };
  ffi::Function::SetGlobal("tvm.rpc.server.workpath",
                           ffi::Function::FromTyped([path_of](ffi::String name) { return ffi::String(path_of(name)); }),
                           true);
  ffi::Function::SetGlobal(
      "tvm.rpc.server.load_module",
      ffi::Function::FromTyped([path_of](ffi::String name) { return ffi::Module::LoadFromFile(path_of(name)); }),
      true);
  ffi::Function::SetGlobal("tvm.rpc.server.listdir", ffi::Function::FromTyped([dir](ffi::String sub) {
                             std::string out;
                             if (DIR* d = opendir((dir + "/" + std::string(sub)).c_str())) {
                               while (dirent* e = readdir(d)) {
                                 std::string n = e->d_name;
                                 if (n != "." && n != "..") out += n + ",";
                               }
                               closedir(d);
                             }
                             return ffi::String(out);
                           }),
                           true);
  ffi::Function::SetGlobal("bscompile.rpc.info", ffi::Function::FromTyped([]() { return ffi::String(InfoJson()); }),
                           true);
  // A per-call deadline: the client arms it before running a candidate and disarms it
  // after; if it fires, SIGALRM ends this session's process (and only it).
  ffi::Function::SetGlobal("bscompile.rpc.watchdog", ffi::Function::FromTyped([](double seconds) {
                             return static_cast<int64_t>(ArmAlarm(seconds));
                           }),
                           true);
}

// --- one session: forked child, timed out by the parent ------------------------------

struct Channel {
  int read_fd, write_fd;
  bool socket;
};

[[noreturn]] void ServeChild(const Channel& ch, const std::string& dir) {
  g_in_session = true;
  signal(SIGPIPE, SIG_IGN);
  signal(SIGALRM, SIG_DFL);
  signal(SIGTERM, SIG_DFL);
  int rc = 0;
  try {
    if (chdir(dir.c_str()) != 0) throw std::runtime_error("cannot enter " + dir);
    RegisterSessionGlobals(dir);
    ffi::Function loop = ffi::Function::GetGlobalRequired("rpc.ServerLoop");
    if (ch.socket) {
      loop(static_cast<int64_t>(ch.read_fd));
    } else {
      int rfd = ch.read_fd, wfd = ch.write_fd;
      ffi::Function fsend = ffi::Function::FromTyped([wfd](ffi::Bytes data) -> int64_t {
        const char* p = data.data();
        size_t left = data.size();
        while (left > 0) {
          ssize_t n = write(wfd, p, left);
          if (n < 0 && errno == EINTR) continue;
          if (n <= 0) return -1;
          p += n;
          left -= static_cast<size_t>(n);
        }
        return static_cast<int64_t>(data.size());
      });
      ffi::Function frecv = ffi::Function::FromTyped([rfd](int64_t size) -> ffi::Bytes {
        std::string buf(static_cast<size_t>(size), '\0');
        ssize_t n;
        do {
          n = read(rfd, buf.data(), buf.size());
        } while (n < 0 && errno == EINTR);
        buf.resize(n > 0 ? static_cast<size_t>(n) : 0);  // 0 bytes: the client hung up
        return ffi::Bytes(buf);
      });
      loop(fsend, frecv);
    }
  } catch (const ffi::Error& e) {
    Log("session error: " + std::string(e.kind()) + ": " + std::string(e.message()));
    rc = 1;
  } catch (const std::exception& e) {
    Log(std::string("session error: ") + e.what());
    rc = 1;
  }
  std::cout.flush();
  // The parent removes the folder too, but a pipe client may have killed it already
  // (TVM's PipeChannel SIGKILLs the process it started when the session closes).
  RemoveEntry(dir);
  _exit(rc);
}

// Runs one session in a child; returns when it ends (or is killed at the deadline).
void RunSession(const Channel& ch, const Options& o, double timeout, const std::vector<int>& close_in_child) {
  std::string dir = MakeWorkDir(o.work_dir);
  pid_t pid = fork();
  if (pid < 0) {
    RemoveEntry(dir);
    throw std::runtime_error(std::string("fork failed (") + std::strerror(errno) + ")");
  }
  if (pid == 0) {
    signal(SIGINT, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    for (int fd : close_in_child) close(fd);
    if (timeout > 0) {  // backstop if the parent dies
      g_session_deadline = Now() + timeout + 1;
      ArmAlarm(0);
    }
    ServeChild(ch, dir);
  }
  if (!ch.socket) {  // the child owns the pipe ends: its exit must reach the client as EOF
    close(ch.read_fd);
    if (ch.write_fd != ch.read_fd) close(ch.write_fd);
  }
  auto start = std::chrono::steady_clock::now();
  int status = 0;
  bool timed_out = false;
  while (true) {
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid || (r < 0 && errno != EINTR)) break;
    double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (g_stop) {
      kill(pid, SIGKILL);
    } else if (timeout > 0 && elapsed > timeout && !timed_out) {
      timed_out = true;
      if (ch.socket) {
        auto ret = ffi::Function::GetGlobal("rpc.ReturnException");
        std::string msg = "RPCSessionTimeoutError: the session exceeded its " + Seconds(timeout) +
                          " timeout on the tuning server";
        if (ret) {
          try {
            (*ret)(static_cast<int64_t>(ch.read_fd), ffi::String(msg));
          } catch (...) {
          }
        }
      }
      kill(pid, SIGKILL);
    }
    usleep(20000);
  }
  if (timed_out) {
    Log("session timed out after " + Seconds(timeout) + ": killed");
  } else if (WIFSIGNALED(status)) {
    Log("session ended by signal " + std::to_string(WTERMSIG(status)) +
        (WTERMSIG(status) == SIGALRM ? " (watchdog)" : " (a kernel crashed?)"));
  } else {
    Log("session ended");
  }
  RemoveEntry(dir);
}

// --- stdio ------------------------------------------------------------------------------

int ServeStdio(const Options& o) {
  // The protocol gets private copies of stdin/stdout; fd 1 then points at stderr so
  // that nothing a kernel or library prints can corrupt the byte stream.
  int rfd = dup(0), wfd = dup(1);
  if (rfd < 0 || wfd < 0) throw std::runtime_error("cannot duplicate stdin/stdout");
  fcntl(rfd, F_SETFD, FD_CLOEXEC);
  fcntl(wfd, F_SETFD, FD_CLOEXEC);
  int devnull = open("/dev/null", O_RDONLY);
  if (devnull >= 0) {
    dup2(devnull, 0);
    close(devnull);
  }
  dup2(2, 1);
  Log("serving one session on stdin/stdout");
  RunSession(Channel{rfd, wfd, false}, o, o.session_timeout, {});
  return 0;
}

// --- TCP ----------------------------------------------------------------------------------

void SendAll(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) throw std::runtime_error(std::string("send failed (") + std::strerror(errno) + ")");
    p += k;
    n -= static_cast<size_t>(k);
  }
}

// Receives exactly n bytes, waiting at most timeout_ms for each chunk.
void RecvAll(int fd, void* data, size_t n, int timeout_ms) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    pollfd pfd{fd, POLLIN, 0};
    int r = poll(&pfd, 1, timeout_ms);
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) throw std::runtime_error("peer did not answer in time");
    ssize_t k = recv(fd, p, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) throw std::runtime_error("connection closed");
    p += k;
    n -= static_cast<size_t>(k);
  }
}

void SendInt(int fd, int32_t v) { SendAll(fd, &v, 4); }  // little-endian hosts (x86-64, aarch64)

int32_t RecvInt(int fd, int timeout_ms) {
  int32_t v;
  RecvAll(fd, &v, 4, timeout_ms);
  return v;
}

void SendJson(int fd, const ffi::Any& value) {
  std::string s = ffi::json::Stringify(value);
  SendInt(fd, static_cast<int32_t>(s.size()));
  SendAll(fd, s.data(), s.size());
}

ffi::Any RecvJson(int fd, int timeout_ms) {
  int32_t n = RecvInt(fd, timeout_ms);
  if (n <= 0 || n > (1 << 24)) throw std::runtime_error("bad message size from the tracker");
  std::string s(static_cast<size_t>(n), '\0');
  RecvAll(fd, s.data(), s.size(), timeout_ms);
  return ffi::json::Parse(ffi::String(s));
}

int ConnectTcp(const std::string& host, int port) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0 || !res) {
    throw std::runtime_error("cannot resolve " + host);
  }
  int fd = -1;
  for (addrinfo* a = res; a; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0) throw std::runtime_error("cannot connect to " + host + ":" + std::to_string(port));
  return fd;
}

int Listen(const std::string& host, int* port) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  if (getaddrinfo(host.c_str(), std::to_string(*port).c_str(), &hints, &res) != 0 || !res) {
    throw UsageError("cannot resolve --host " + host);
  }
  int fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 4) != 0) {
    std::string why = std::strerror(errno);
    freeaddrinfo(res);
    throw std::runtime_error("cannot listen on " + host + ":" + std::to_string(*port) + " (" + why + ")");
  }
  freeaddrinfo(res);
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
  *port = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                         : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  return fd;
}

std::string RandomKey(const std::string& prefix) {
  static std::mt19937_64 gen(std::random_device{}() ^ static_cast<uint64_t>(getpid()));
  return prefix + ":" + std::to_string(std::uniform_real_distribution<double>(0, 1)(gen));
}

// The tracker's view of this server (tvm.rpc.server._listen_loop, client side).
class TrackerLink {
 public:
  TrackerLink(const Options& o, int port) : o_(o), port_(port) {}
  ~TrackerLink() { Close(); }

  int fd() const { return fd_; }

  // Connects (retrying for up to a minute) and announces the server.
  void Connect() {
    auto start = std::chrono::steady_clock::now();
    while (true) {
      try {
        fd_ = ConnectTcp(o_.tracker_host, o_.tracker_port);
        SendInt(fd_, kRPCTrackerMagic);
        if (RecvInt(fd_, 10000) != kRPCTrackerMagic) throw UsageError("--tracker is not a TVM RPC tracker");
        ffi::Map<ffi::Any, ffi::Any> info;
        info.Set(ffi::String("key"), ffi::String("server:" + o_.key));
        info.Set(ffi::String("addr"), ffi::Array<ffi::Any>{Addr(), static_cast<int64_t>(port_)});
        SendJson(fd_, ffi::Array<ffi::Any>{static_cast<int64_t>(kUpdateInfo), info});
        Expect(kSuccess);
        Log("registered with tracker " + o_.tracker_host + ":" + std::to_string(o_.tracker_port) + " as '" + o_.key +
            "'");
        return;
      } catch (const UsageError&) {
        throw;
      } catch (const std::exception& e) {
        Close();
        double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (waited > 60) throw std::runtime_error(std::string("tracker unreachable for 60 s: ") + e.what());
        if (g_stop) throw std::runtime_error("stopped by a signal while connecting to the tracker");
        sleep(2);
      }
    }
  }

  // Offers this server for one session under a fresh match key.
  void Put() {
    matchkey_ = RandomKey(o_.key);
    SendJson(fd_, ffi::Array<ffi::Any>{static_cast<int64_t>(kPut), ffi::String(o_.key),
                                       ffi::Array<ffi::Any>{static_cast<int64_t>(port_), ffi::String(matchkey_)},
                                       Addr()});
    Expect(kSuccess);
    unmatched_periods_ = 0;
  }

  // Called every ping period without a connection: a key a client took but never used
  // is replaced (as tvm.rpc.server does).
  void Ping(double period) {
    SendJson(fd_, ffi::Array<ffi::Any>{static_cast<int64_t>(kGetPendingMatchKeys)});
    auto pending = RecvJson(fd_, 10000).cast<ffi::Array<ffi::Any>>();
    bool found = false;
    for (const ffi::Any& k : pending) found |= k.try_cast<ffi::String>().value_or("") == matchkey_;
    unmatched_periods_ = found ? 0 : unmatched_periods_ + 1;
    if (unmatched_periods_ * period > 4 + period) Put();
  }

  const std::string& matchkey() const { return matchkey_; }

  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

 private:
  ffi::Any Addr() const { return o_.custom_addr.empty() ? ffi::Any() : ffi::Any(ffi::String(o_.custom_addr)); }

  void Expect(int64_t code) {
    auto v = RecvJson(fd_, 10000).try_cast<int64_t>();
    if (!v.has_value() || *v != code) throw std::runtime_error("unexpected tracker reply");
  }

  const Options& o_;
  int port_;
  int fd_ = -1;
  std::string matchkey_;
  int unmatched_periods_ = 0;
};

// The client's handshake (tvm.rpc.server): magic, "client:<key> [-timeout=S]"; we answer
// success and "server:<key>". Returns the session timeout the client asked for (0 = none),
// or -1 when the connection is not for us.
double Handshake(int conn, const std::string& expect_key, const std::string& rpc_key) {
  if (RecvInt(conn, 10000) != kRPCMagic) return -1;
  int32_t len = RecvInt(conn, 10000);
  if (len < 0 || len > 4096) return -1;
  std::string key(static_cast<size_t>(len), '\0');
  RecvAll(conn, key.data(), key.size(), 10000);
  std::istringstream words(key);
  std::string head, opt;
  words >> head;
  if (head != "client:" + expect_key) {
    SendInt(conn, kRPCCodeMismatch);
    return -1;
  }
  double timeout = 0;
  while (words >> opt) {
    if (opt.rfind("-timeout=", 0) == 0) timeout = std::atof(opt.c_str() + 9);
  }
  std::string reply = "server:" + rpc_key;
  SendInt(conn, kRPCCodeSuccess);
  SendInt(conn, static_cast<int32_t>(reply.size()));
  SendAll(conn, reply.data(), reply.size());
  return timeout;
}

int ServeTcp(const Options& o) {
  int port = o.port;
  int lfd = Listen(o.host, &port);
  // One machine-readable line on stdout: clients and scripts read the bound port from it.
  std::cout << "bscompile-rpc-server listening on " << o.host << ":" << port << std::endl;
  std::unique_ptr<TrackerLink> tracker;
  if (!o.tracker_host.empty()) {
    bool local_tracker = o.tracker_host == "127.0.0.1" || o.tracker_host == "localhost" || o.tracker_host == "::1";
    if (!local_tracker && (o.host == "127.0.0.1" || o.host == "localhost")) {
      Log("warning: listening on " + o.host + " only: clients the tracker sends here from other machines cannot "
          "connect (give --host 0.0.0.0 on a trusted network)");
    }
    tracker = std::make_unique<TrackerLink>(o, port);
    tracker->Connect();
    tracker->Put();
  }
  const double ping = 2.0;
  auto idle_since = std::chrono::steady_clock::now();
  int sessions = 0;
  while ((o.max_sessions == 0 || sessions < o.max_sessions) && !g_stop) {
    pollfd pfd{lfd, POLLIN, 0};
    int r = poll(&pfd, 1, static_cast<int>(ping * 1000));
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) {
      double idle = std::chrono::duration<double>(std::chrono::steady_clock::now() - idle_since).count();
      if (o.idle_timeout > 0 && idle > o.idle_timeout) {
        Log("no session for " + std::to_string(static_cast<int>(idle)) + " s: exiting (--idle-timeout)");
        break;
      }
      if (tracker) {
        try {
          tracker->Ping(ping);
        } catch (const std::exception& e) {
          Log(std::string("lost the tracker (") + e.what() + "): reconnecting");
          tracker->Close();
          tracker->Connect();
          tracker->Put();
        }
      }
      continue;
    }
    sockaddr_storage peer{};
    socklen_t plen = sizeof(peer);
    int conn = accept4(lfd, reinterpret_cast<sockaddr*>(&peer), &plen, SOCK_CLOEXEC);
    if (conn < 0) continue;
    int one = 1;
    setsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    char addr[NI_MAXHOST] = "?";
    getnameinfo(reinterpret_cast<sockaddr*>(&peer), plen, addr, sizeof(addr), nullptr, 0, NI_NUMERICHOST);
    double asked;
    try {
      asked = Handshake(conn, tracker ? tracker->matchkey() : o.key, o.key);
    } catch (const std::exception& e) {
      asked = -1;
    }
    if (asked < 0) {
      Log(std::string("refused a connection from ") + addr + " (wrong magic or key)");
      close(conn);
      continue;
    }
    double timeout = o.session_timeout;
    if (asked > 0 && (timeout == 0 || asked < timeout)) timeout = asked;
    Log(std::string("session from ") + addr + (timeout > 0 ? ", timeout " + Seconds(timeout) : ""));
    std::vector<int> close_in_child = {lfd};
    if (tracker) close_in_child.push_back(tracker->fd());
    try {
      RunSession(Channel{conn, conn, true}, o, timeout, close_in_child);
    } catch (const std::exception& e) {
      Log(std::string("session failed: ") + e.what());
    }
    close(conn);
    ++sessions;
    idle_since = std::chrono::steady_clock::now();
    if (tracker) {
      try {
        tracker->Put();
      } catch (const std::exception& e) {
        tracker->Close();
        tracker->Connect();
        tracker->Put();
      }
    }
  }
  close(lfd);
  return 0;
}

int Run(const Options& o) {
  if (o.help) {
    std::cout << kUsage;
    return 0;
  }
  if (o.info) {
    std::cout << InfoJson() << std::endl;
    return 0;
  }
  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa {};
  sa.sa_handler = OnStopSignal;  // no SA_RESTART: poll() returns and the loops see g_stop
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGTERM, SIGINT, SIGHUP}) sigaction(sig, &sa, nullptr);
  int rc = o.stdio ? ServeStdio(o) : ServeTcp(o);
  if (g_stop) Log("stopped by a signal");
  return rc;
}

}  // namespace
}  // namespace bscompile

int main(int argc, char** argv) {
  bscompile::UnpinThreadPool();  // before TVM creates its pool
  return bscompile::GuardedMain([&] { return bscompile::Run(bscompile::ParseArgs(argc, argv)); }, "--help");
}
