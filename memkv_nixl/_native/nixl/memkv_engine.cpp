// The MEMKV NIXL backend engine: NIXL transfers between local DRAM and memkv servers.
//
// Descriptor -> storage mapping:
//   OBJ_SEG  (key mode): registration key = metaInfo, or str(devId) when empty; a transfer's
//            remote descriptor names the key (addr must be 0: blocks are stored whole). WRITE
//            stores the local bytes under the key (a committed key is kept), READ loads them;
//            a missing key fails the transfer with NIXL_ERR_NOT_FOUND.
//   FILE_SEG (region mode): devId is an open fd; the region is named from the file's identity
//            (host + real path), and each (offset, length) written becomes the block
//            "<region>@<offset>" (replacing what was there, as a file write would).
// postXfer hands the whole batch to an engine thread and returns IN_PROG; checkXfer polls;
// releaseReqH cancels an in-flight transfer by shutting its sockets down (one per server, served
// at once). No exception ever leaves this file: every entry point returns a status.
#include <algorithm>
#include <atomic>
#include <cctype>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>

#include <limits.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <dlfcn.h>
#include <unistd.h>

#include "memkv_conn.h"
#include "nixl_abi.h"
#include "plugin_manifest.h"

static_assert(sizeof(nixlBackendEngine) == 0xd0, "NIXL engine base layout");

namespace {

void logf(const char *fmt, const std::string &a, const std::string &b = "") {
    std::fprintf(stderr, "memkv-nixl: ");
    std::fprintf(stderr, fmt, a.c_str(), b.c_str());
    std::fputc('\n', stderr);
}

struct Endpoint {
    std::string host;
    int port = 9900;
    uint64_t seed = 0;
    std::mutex mu;
    std::vector<memkv_conn> idle;
    std::chrono::steady_clock::time_point down_until{};
    bool warned = false;
    bool cma_warned = false;
    std::string name() const { return port ? host + ":" + std::to_string(port) : host; }
};

struct Config {
    std::vector<std::unique_ptr<Endpoint>> endpoints;
    std::string ns, secret;
    int timeout_ms = 30000;
    bool verify = true;
    bool same_host = true;
    int threads = 4;
};

enum class Kind { DRAM, VRAM, OBJ, FILE };

// CUDA runtime, loaded at engine creation only where it exists: VRAM_SEG transfers are staged
// through pinned host memory. Nothing here runs (or is linked) on a machine without CUDA.
struct Cuda {
    int (*getDeviceCount)(int *) = nullptr;
    int (*memcpy)(void *, const void *, size_t, int) = nullptr;  // kind 4: cudaMemcpyDefault (UVA)
    int (*mallocHost)(void **, size_t) = nullptr;
    int (*freeHost)(void *) = nullptr;
    bool ok = false;

    Cuda() {
        void *lib = nullptr;
        for (const char *name : {"libcudart.so.12", "libcudart.so.13", "libcudart.so"})
            if ((lib = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
        int devices = 0;
        if (lib) {
            getDeviceCount = (int (*)(int *))dlsym(lib, "cudaGetDeviceCount");
            memcpy = (int (*)(void *, const void *, size_t, int))dlsym(lib, "cudaMemcpy");
            mallocHost = (int (*)(void **, size_t))dlsym(lib, "cudaMallocHost");
            freeHost = (int (*)(void *))dlsym(lib, "cudaFreeHost");
            ok = getDeviceCount && memcpy && mallocHost && freeHost && getDeviceCount(&devices) == 0 &&
                 devices > 0;
        }
        if (!ok)
            std::fprintf(stderr, "memkv-nixl: no CUDA device/runtime found; VRAM_SEG is not offered "
                                 "(DRAM, OBJ and FILE are)\n");
    }
};

struct MemkvMD : nixlBackendMD {
    Kind kind;
    std::string name;  // OBJ: the key; FILE: the region
    MemkvMD(Kind k, std::string n) : nixlBackendMD(true), kind(k), name(std::move(n)) {}
};

struct Job {
    nixl_xfer_op_t op;
    bool vram = false;     // local side is GPU memory: stage through pinned host memory
    bool replace = false;  // region mode
    std::vector<std::string> keys;
    std::vector<uint64_t> ptrs, lens;
    std::atomic<int> status{NIXL_ERR_NOT_POSTED};
    std::atomic<bool> abandoned{false};
    std::mutex mu;                 // guards active and running
    std::condition_variable cv;
    // sockets in use, one per server being served (fd, cma: the server copies into caller memory
    // itself, on the same host)
    std::vector<std::pair<int, bool>> active;
    bool running = false;
};

struct MemkvReq : nixlBackendReqH {
    std::shared_ptr<Job> job;
};

bool parse_bool(const std::string &v, bool &out) {
    if (v == "true" || v == "1" || v == "yes") return out = true, true;
    if (v == "false" || v == "0" || v == "no") return out = false, true;
    return false;
}

}  // namespace

class nixlMemkvEngine : public nixlBackendEngine {
public:
    explicit nixlMemkvEngine(const nixlBackendInitParams *init) : nixlBackendEngine(init) {
        std::string err = configure(getCustomParams());
        if (!err.empty()) {
            logf("cannot create backend MEMKV: %s", err);
            initErr = true;
            return;
        }
        for (int i = 0; i < cfg_.threads; i++) workers_.emplace_back([this] { work(); });
    }

    ~nixlMemkvEngine() override {
        {
            std::lock_guard<std::mutex> g(qmu_);
            stop_ = true;
        }
        qcv_.notify_all();
        for (auto &t : workers_) t.join();
        for (auto &ep : cfg_.endpoints)
            for (auto &c : ep->idle) memkv_conn_close(&c);
    }

    bool supportsRemote() const override { return false; }
    bool supportsLocal() const override { return true; }
    bool supportsNotif() const override { return false; }
    nixl_mem_list_t getSupportedMems() const override {
        nixl_mem_list_t mems = MEMKV_PLUGIN_MEMS;
        if (cuda_.ok) mems.push_back(VRAM_SEG);
        return mems;
    }

    nixl_status_t registerMem(const nixlBlobDesc &mem, const nixl_mem_t &type,
                              nixlBackendMD *&out) override {
        try {
            switch (type) {
            case DRAM_SEG:
                out = new MemkvMD(Kind::DRAM, "");
                return NIXL_SUCCESS;
            case OBJ_SEG: {
                std::string key = mem.metaInfo.empty() ? std::to_string(mem.devId) : mem.metaInfo;
                if (key.size() > MEMKV_MAX_KEY) {
                    logf("OBJ key of %s bytes is longer than the 128-byte limit%s",
                         std::to_string(key.size()));
                    return NIXL_ERR_INVALID_PARAM;
                }
                out = new MemkvMD(Kind::OBJ, key);
                return NIXL_SUCCESS;
            }
            case VRAM_SEG:
                if (!cuda_.ok) return NIXL_ERR_NOT_SUPPORTED;
                out = new MemkvMD(Kind::VRAM, "");
                return NIXL_SUCCESS;
            case FILE_SEG: {
                std::string region = region_of((int)mem.devId);
                if (region.empty()) return NIXL_ERR_INVALID_PARAM;
                out = new MemkvMD(Kind::FILE, region);
                return NIXL_SUCCESS;
            }
            default:
                return NIXL_ERR_NOT_SUPPORTED;
            }
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    nixl_status_t deregisterMem(nixlBackendMD *meta) override {
        delete static_cast<MemkvMD *>(meta);
        return NIXL_SUCCESS;
    }
    nixl_status_t connect(const std::string &) override { return NIXL_SUCCESS; }
    nixl_status_t disconnect(const std::string &) override { return NIXL_SUCCESS; }
    nixl_status_t unloadMD(nixlBackendMD *) override { return NIXL_SUCCESS; }
    nixl_status_t loadLocalMD(nixlBackendMD *in, nixlBackendMD *&out) override {
        out = in;
        return NIXL_SUCCESS;
    }

    nixl_status_t prepXfer(const nixl_xfer_op_t &op, const nixl_meta_dlist_t &local,
                           const nixl_meta_dlist_t &remote, const std::string &,
                           nixlBackendReqH *&handle, const nixl_opt_b_args_t *) const override {
        try {
            if (op != NIXL_READ && op != NIXL_WRITE) return NIXL_ERR_INVALID_PARAM;
            bool local_ok = local.getType() == DRAM_SEG || (local.getType() == VRAM_SEG && cuda_.ok);
            if (!local_ok || (remote.getType() != OBJ_SEG && remote.getType() != FILE_SEG)) {
                logf("transfers go between DRAM%s and OBJ or FILE descriptors", cuda_.ok ? " or VRAM" : "");
                return NIXL_ERR_NOT_SUPPORTED;
            }
            if (local.descCount() != remote.descCount()) return NIXL_ERR_INVALID_PARAM;
            auto job = std::make_shared<Job>();
            job->op = op;
            job->replace = remote.getType() == FILE_SEG;
            job->vram = local.getType() == VRAM_SEG;
            size_t n = (size_t)local.descCount();
            job->keys.reserve(n);
            job->ptrs.reserve(n);
            job->lens.reserve(n);
            for (size_t i = 0; i < n; i++) {
                const nixlMetaDesc &l = local.descs[i], &r = remote.descs[i];
                auto *md = static_cast<MemkvMD *>(r.metadataP);
                if (!md || l.len != r.len || l.len == 0) {
                    logf("descriptor %s: lengths differ or metadata is missing%s", std::to_string(i));
                    return NIXL_ERR_INVALID_PARAM;
                }
                if (md->kind == Kind::OBJ) {
                    if (r.addr != 0) {
                        logf("descriptor %s: OBJ offset must be 0 (memkv stores blocks whole)%s",
                             std::to_string(i));
                        return NIXL_ERR_NOT_SUPPORTED;
                    }
                    job->keys.push_back(md->name);
                } else {
                    char off[32];
                    std::snprintf(off, sizeof off, "@%llx", (unsigned long long)r.addr);
                    job->keys.push_back(md->name + off);
                }
                job->ptrs.push_back(l.addr);
                job->lens.push_back(l.len);
            }
            auto *req = new MemkvReq();
            req->job = std::move(job);
            handle = req;
            return NIXL_SUCCESS;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    nixl_status_t postXfer(const nixl_xfer_op_t &, const nixl_meta_dlist_t &,
                           const nixl_meta_dlist_t &, const std::string &, nixlBackendReqH *&handle,
                           const nixl_opt_b_args_t *) const override {
        auto &job = static_cast<MemkvReq *>(handle)->job;
        {
            std::lock_guard<std::mutex> g(job->mu);
            if (job->running) return NIXL_ERR_REPOST_ACTIVE;
            job->running = true;
            job->status = NIXL_IN_PROG;
        }
        {
            std::lock_guard<std::mutex> g(qmu_);
            queue_.push_back(job);
        }
        qcv_.notify_one();
        return NIXL_IN_PROG;
    }

    nixl_status_t checkXfer(nixlBackendReqH *handle) const override {
        return (nixl_status_t) static_cast<MemkvReq *>(handle)->job->status.load();
    }

    nixl_status_t releaseReqH(nixlBackendReqH *handle) const override {
        auto *req = static_cast<MemkvReq *>(handle);
        auto job = req->job;
        {
            // in flight: abort its socket so the worker stops touching caller memory promptly,
            // then wait for it to let go (a socket shutdown returns blocked calls at once). With
            // cma the server writes caller memory itself: only our sending side is shut, which
            // stops it before its next copy, and the worker reads on until the server has closed
            std::unique_lock<std::mutex> g(job->mu);
            job->abandoned = true;
            for (auto &a : job->active) ::shutdown(a.first, a.second ? SHUT_WR : SHUT_RDWR);
            job->cv.wait(g, [&] { return !job->running || job->active.empty(); });
        }
        delete req;
        return NIXL_SUCCESS;
    }

    nixl_status_t queryMem(const nixl_reg_dlist_t &descs,
                           std::vector<nixl_query_resp_t> &resp) const override {
        try {
            size_t n = (size_t)descs.descCount();
            resp.assign(n, std::nullopt);
            if (descs.getType() != OBJ_SEG) return NIXL_ERR_NOT_SUPPORTED;
            Job job;
            for (size_t i = 0; i < n; i++) {
                const nixlBlobDesc &d = descs.descs[i];
                job.keys.push_back(d.metaInfo.empty() ? std::to_string(d.devId) : d.metaInfo);
            }
            std::vector<uint8_t> st(n, MEMKV_ST_MISS);
            run_keyed(job, MEMKV_OP_EXISTS, st);  // an unreachable server answers "absent"
            for (size_t i = 0; i < n; i++)
                if (st[i] == MEMKV_ST_OK) resp[i] = nixl_b_params_t{};
            return NIXL_SUCCESS;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

private:
    Config cfg_;
    mutable std::mutex qmu_;
    mutable std::condition_variable qcv_;
    mutable std::deque<std::shared_ptr<Job>> queue_;
    bool stop_ = false;
    std::vector<std::thread> workers_;
    Cuda cuda_;  // before the workers start: they read it

    std::string configure(const nixl_b_params_t &params) {
        nixl_b_params_t p = MEMKV_PLUGIN_DEFAULTS;
        for (auto &kv : params) {
            if (!p.count(kv.first)) return "unknown parameter '" + kv.first + "' (known: " + MEMKV_PLUGIN_PARAM_NAMES + ")";
            p[kv.first] = kv.second;
        }
        std::string eps = p["endpoints"];
        std::replace(eps.begin(), eps.end(), ',', ' ');
        size_t pos = 0;
        while (pos < eps.size()) {
            size_t end = eps.find(' ', pos);
            std::string ep = eps.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
            pos = end == std::string::npos ? eps.size() : end + 1;
            if (ep.empty()) continue;
            auto e = std::make_unique<Endpoint>();
            if (ep.rfind("memkv+unix://", 0) == 0) { // same host: unix socket, cma where granted
                e->host = ep.substr(13);
                if (e->host.empty() || e->host[0] != '/')
                    return "parameter 'endpoints': '" + ep + "' needs an absolute path (memkv+unix:///run/memkv.sock)";
                e->port = 0;
                e->seed = memkv_xxh3(e->host.data(), e->host.size(), 0); // as the Python client
                cfg_.endpoints.push_back(std::move(e));
                continue;
            }
            if (ep.rfind("memkv://", 0) == 0) ep = ep.substr(8);
            size_t colon = ep.rfind(':');
            e->host = colon == std::string::npos ? ep : ep.substr(0, colon);
            if (colon != std::string::npos) {
                char *endp = nullptr;
                long port = std::strtol(ep.c_str() + colon + 1, &endp, 10);
                if (*endp || port <= 0 || port > 65535)
                    return "parameter 'endpoints': bad port in '" + ep + "' (expected memkv://host:port)";
                e->port = (int)port;
            }
            std::string name = e->host + ":" + std::to_string(e->port);
            e->seed = memkv_xxh3(name.data(), name.size(), 0);
            cfg_.endpoints.push_back(std::move(e));
        }
        if (cfg_.endpoints.empty()) return "parameter 'endpoints' names no server (e.g. memkv://127.0.0.1:9900)";
        cfg_.ns = p["namespace"];
        if (cfg_.ns.empty() || cfg_.ns.size() > MEMKV_MAX_KEY)
            return "parameter 'namespace' must have 1..128 bytes";
        if (!p["secret_file"].empty()) {
            FILE *f = std::fopen(p["secret_file"].c_str(), "rb");
            if (!f) return "parameter 'secret_file': cannot read " + p["secret_file"];
            char buf[4096];
            size_t k = std::fread(buf, 1, sizeof buf, f);
            std::fclose(f);
            std::string s(buf, k);
            while (!s.empty() && std::isspace((unsigned char)s.back())) s.pop_back();
            while (!s.empty() && std::isspace((unsigned char)s.front())) s.erase(0, 1);
            if (s.empty()) return "parameter 'secret_file': " + p["secret_file"] + " is empty";
            cfg_.secret = s;
        }
        char *endp = nullptr;
        long t = std::strtol(p["timeout_ms"].c_str(), &endp, 10);
        if (*endp || t < 1 || t > 3600000) return "parameter 'timeout_ms' must be 1..3600000, got '" + p["timeout_ms"] + "'";
        cfg_.timeout_ms = (int)t;
        if (!parse_bool(p["verify"], cfg_.verify)) return "parameter 'verify' must be true or false, got '" + p["verify"] + "'";
        if (!parse_bool(p["same_host"], cfg_.same_host))
            return "parameter 'same_host' must be true or false, got '" + p["same_host"] + "'";
        long th = std::strtol(p["threads"].c_str(), &endp, 10);
        if (*endp || th < 1 || th > 64) return "parameter 'threads' must be 1..64, got '" + p["threads"] + "'";
        cfg_.threads = (int)th;
        return "";
    }

    static std::string region_of(int fd) {
        char link[64], path[PATH_MAX + 1];
        std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t k = readlink(link, path, PATH_MAX);
        struct stat st;
        if (k <= 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
            logf("FILE_SEG devId %s is not an open regular file%s", std::to_string(fd));
            return "";
        }
        path[k] = 0;
        char host[256] = {0};
        gethostname(host, sizeof host - 1);
        return std::string("file:") + host + ":" + path;
    }

    // ---- connections --------------------------------------------------------------------------
    bool acquire(Endpoint &ep, memkv_conn &c, std::string &err) const {
        {
            std::lock_guard<std::mutex> g(ep.mu);
            if (!ep.idle.empty()) {
                c = ep.idle.back();
                ep.idle.pop_back();
                return true;
            }
            if (std::chrono::steady_clock::now() < ep.down_until) {
                err = ep.name() + " is marked down";
                return false;
            }
        }
        char msg[512] = {0};
        int rc = memkv_conn_open(&c, ep.host.c_str(), ep.port, (const uint8_t *)cfg_.ns.data(),
                                 cfg_.ns.size(), (const uint8_t *)cfg_.secret.data(), cfg_.secret.size(),
                                 cfg_.timeout_ms, cfg_.same_host, msg, sizeof msg);
        if (rc == 0) {
            std::lock_guard<std::mutex> g(ep.mu);
            if (ep.warned) logf("server %s is reachable again%s", ep.name());
            ep.warned = false;
            if (!ep.port && !c.cma && !ep.cma_warned) {
                ep.cma_warned = true;
                logf("server %s did not grant same-host copies (cma) to this process; blocks go "
                     "through its unix socket (the server log says why)%s", ep.name());
            }
            return true;
        }
        err = msg[0] ? msg : std::strerror(-rc);
        mark_down(ep, err);
        return false;
    }

    void release(Endpoint &ep, memkv_conn &c, bool healthy) const {
        if (!healthy) {
            memkv_conn_close(&c);
            return;
        }
        std::lock_guard<std::mutex> g(ep.mu);
        ep.idle.push_back(c);
    }

    void mark_down(Endpoint &ep, const std::string &why) const {
        std::lock_guard<std::mutex> g(ep.mu);
        ep.down_until = std::chrono::steady_clock::now() + std::chrono::seconds(1);
        if (!ep.warned) logf("server unreachable (%s)%s; its keys fail until it is back", why);
        ep.warned = true;
    }

    // ---- transfers ----------------------------------------------------------------------------
    void work() {
        for (;;) {
            std::shared_ptr<Job> job;
            {
                std::unique_lock<std::mutex> g(qmu_);
                qcv_.wait(g, [this] { return stop_ || !queue_.empty(); });
                if (stop_ && queue_.empty()) return;
                job = queue_.front();
                queue_.pop_front();
            }
            int status = job->vram ? run_staged(*job) : run_transfer(*job);
            std::lock_guard<std::mutex> g(job->mu);
            job->status = status;
            job->running = false;
            job->active.clear();
            job->cv.notify_all();
        }
    }

    // Keys grouped by owning server (rendezvous hashing, as the Python client does).
    std::vector<std::vector<size_t>> place(const Job &job) const {
        size_t n = job.keys.size(), ns = cfg_.endpoints.size();
        std::vector<std::vector<size_t>> groups(ns);
        if (ns == 1) {
            for (size_t i = 0; i < n; i++) groups[0].push_back(i);
            return groups;
        }
        std::string blob;
        std::vector<uint16_t> lens(n);
        for (size_t i = 0; i < n; i++) {
            blob += job.keys[i];
            lens[i] = (uint16_t)job.keys[i].size();
        }
        std::vector<uint64_t> seeds(ns);
        for (size_t j = 0; j < ns; j++) seeds[j] = cfg_.endpoints[j]->seed;
        std::vector<uint32_t> owner(n);
        memkv_rendezvous((uint32_t)n, (const uint8_t *)blob.data(), lens.data(), (uint32_t)ns,
                         seeds.data(), owner.data());
        for (size_t i = 0; i < n; i++) groups[owner[i]].push_back(i);
        return groups;
    }

    // GPU memory: one pinned host buffer for the job; WRITE copies device->host first, READ
    // copies host->device after a successful load. Blocks are never served from GPU memory.
    int run_staged(Job &job) const {
        uint64_t total = 0;
        for (uint64_t l : job.lens) total += l;
        void *stage = nullptr;
        if (cuda_.mallocHost(&stage, total) != 0) {
            logf("cannot allocate %s bytes of pinned staging memory%s", std::to_string(total));
            return NIXL_ERR_BACKEND;
        }
        std::vector<uint64_t> gpu = job.ptrs;
        uint64_t off = 0;
        for (size_t i = 0; i < gpu.size(); off += job.lens[i], i++) job.ptrs[i] = (uint64_t)stage + off;
        int status = NIXL_SUCCESS;
        if (job.op == NIXL_WRITE)
            for (size_t i = 0; i < gpu.size() && status == NIXL_SUCCESS; i++)
                if (cuda_.memcpy((void *)job.ptrs[i], (const void *)gpu[i], job.lens[i], 4) != 0)
                    status = NIXL_ERR_BACKEND;
        if (status == NIXL_SUCCESS) status = run_transfer(job);
        if (status == NIXL_SUCCESS && job.op == NIXL_READ)
            for (size_t i = 0; i < gpu.size() && status == NIXL_SUCCESS; i++)
                if (cuda_.memcpy((void *)gpu[i], (const void *)job.ptrs[i], job.lens[i], 4) != 0)
                    status = NIXL_ERR_BACKEND;
        job.ptrs = std::move(gpu);  // a re-post stages again
        cuda_.freeHost(stage);
        return status;
    }

    // Each server's keys on their own thread: a batch takes as long as its slowest server, not the
    // sum of them. The first non-success, in server order, is the transfer's status.
    int run_transfer(Job &job) const {
        auto groups = place(job);
        std::vector<size_t> used;
        for (size_t s = 0; s < groups.size(); s++)
            if (!groups[s].empty()) used.push_back(s);
        std::vector<int> results(used.size(), NIXL_SUCCESS);
        std::vector<std::thread> others;
        others.reserve(used.size());
        std::vector<size_t> here = {0};  // run on this thread: the first, and any without a thread
        // an exception must not escape a thread (std::terminate would end the inference process)
        auto one = [&](size_t u) {
            try {
                results[u] = run_group(job, used[u], groups[used[u]]);
            } catch (...) {
                results[u] = NIXL_ERR_BACKEND;
            }
        };
        for (size_t u = 1; u < used.size(); u++) {
            try {
                others.emplace_back(one, u);
            } catch (...) {
                here.push_back(u);
            }
        }
        for (size_t u : here)
            if (u < used.size()) one(u);
        for (auto &t : others) t.join();
        for (int r : results)
            if (r != NIXL_SUCCESS) return r;
        return NIXL_SUCCESS;
    }

    int run_group(Job &job, size_t s, const std::vector<size_t> &idx) const {
        int result = NIXL_SUCCESS;
        Endpoint &ep = *cfg_.endpoints[s];
        memkv_conn c;
        std::string err;
        if (!acquire(ep, c, err)) {
            logf("transfer failed: %s%s", err);
            return NIXL_ERR_BACKEND;
        }
        {
            std::lock_guard<std::mutex> g(job.mu);
            if (job.abandoned) {
                release(ep, c, true);
                return NIXL_ERR_CANCELED;
            }
            job.active.emplace_back(c.fd, c.cma != 0);
        }
        bool healthy = true;
        size_t step = c.max_batch ? c.max_batch : 1024;
        for (size_t k = 0; k < idx.size() && result == NIXL_SUCCESS; k += step) {
            size_t m = std::min(step, idx.size() - k);
            std::string blob;
            std::vector<uint16_t> klen(m);
            std::vector<uint64_t> ptrs(m), lens(m), got(m);
            std::vector<uint8_t> st(m);
            for (size_t j = 0; j < m; j++) {
                size_t i = idx[k + j];
                blob += job.keys[i];
                klen[j] = (uint16_t)job.keys[i].size();
                ptrs[j] = job.ptrs[i];
                lens[j] = job.lens[i];
            }
            char msg[512] = {0};
            int rc = job.op == NIXL_WRITE
                ? memkv_conn_put(&c, (uint32_t)m, (const uint8_t *)blob.data(), klen.data(), ptrs.data(),
                                 lens.data(), job.replace ? MEMKV_PUT_REPLACE : 0, st.data(), msg, sizeof msg)
                : memkv_conn_get(&c, (uint32_t)m, (const uint8_t *)blob.data(), klen.data(), ptrs.data(),
                                 lens.data(), cfg_.verify, st.data(), got.data(), msg, sizeof msg);
            if (rc != 0) {
                healthy = false;
                if (job.abandoned) {
                    result = NIXL_ERR_CANCELED;
                    break;
                }
                logf("transfer failed: %s%s", rc == 1 ? std::string(msg) : std::string(std::strerror(-rc)));
                if (rc < 0) mark_down(ep, std::strerror(-rc));
                result = NIXL_ERR_BACKEND;
                break;
            }
            for (size_t j = 0; j < m && result == NIXL_SUCCESS; j++) {
                if (st[j] == MEMKV_ST_MISS) {
                    result = NIXL_ERR_NOT_FOUND;
                } else if (st[j] != MEMKV_ST_OK) {
                    logf("key %s failed with memkv status %s", job.keys[idx[k + j]], std::to_string(st[j]));
                    result = NIXL_ERR_BACKEND;
                } else if (job.op == NIXL_READ && got[j] != lens[j]) {
                    logf("key %s holds a block of another length%s", job.keys[idx[k + j]]);
                    result = NIXL_ERR_MISMATCH;
                }
            }
        }
        {
            std::lock_guard<std::mutex> g(job.mu);
            if (job.abandoned) healthy = false;  // releaseReqH may have shut its socket down
            job.active.erase(std::find(job.active.begin(), job.active.end(), std::make_pair(c.fd, c.cma != 0)));
            job.cv.notify_all();
        }
        release(ep, c, healthy);
        return result;
    }

    void run_keyed(const Job &job, uint8_t op, std::vector<uint8_t> &out) const {
        auto groups = place(job);
        for (size_t s = 0; s < groups.size(); s++) {
            if (groups[s].empty()) continue;
            Endpoint &ep = *cfg_.endpoints[s];
            memkv_conn c;
            std::string err;
            if (!acquire(ep, c, err)) continue;
            std::string blob;
            std::vector<uint16_t> klen;
            for (size_t i : groups[s]) {
                blob += job.keys[i];
                klen.push_back((uint16_t)job.keys[i].size());
            }
            std::vector<uint8_t> st(klen.size());
            char msg[512];
            int rc = memkv_conn_keyed(&c, op, (uint32_t)klen.size(), (const uint8_t *)blob.data(),
                                      klen.data(), st.data(), msg, sizeof msg);
            if (rc == 0)
                for (size_t j = 0; j < klen.size(); j++) out[groups[s][j]] = st[j];
            release(ep, c, rc == 0);
        }
    }
};

// ---- plugin entry points -------------------------------------------------------------------------
namespace {

nixlBackendEngine *create_engine(const nixlBackendInitParams *init) {
    try {
        return new nixlMemkvEngine(init);
    } catch (...) {
        return nullptr;
    }
}

void destroy_engine(nixlBackendEngine *engine) { delete engine; }
const char *plugin_name() { return MEMKV_PLUGIN_NAME; }
const char *plugin_version() { return MEMKV_PLUGIN_VERSION; }
nixl_b_params_t backend_options() { return MEMKV_PLUGIN_DEFAULTS; }
nixl_mem_list_t backend_mems() { return MEMKV_PLUGIN_MEMS; }

nixlBackendPlugin plugin = {1, create_engine, destroy_engine, plugin_name, plugin_version,
                            backend_options, backend_mems};

}  // namespace

extern "C" __attribute__((visibility("default"))) nixlBackendPlugin *nixl_plugin_init() { return &plugin; }
extern "C" __attribute__((visibility("default"))) void nixl_plugin_fini() {}
