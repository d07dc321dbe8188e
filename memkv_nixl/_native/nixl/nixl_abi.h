// The NIXL backend-plugin ABI, declared by us (no NIXL headers ship in any package we can use).
//
// Matches NIXL 1.0 .. 1.5.x as found in the nixl-cu12 1.5.1 / nixl-cu13 1.5.0 wheels: the engine
// virtual-table order, the base-class data layout (0xd0 bytes), the descriptor layouts and the
// plugin descriptor returned by nixl_plugin_init. tests/test_nixl_abi.py compares our engine's
// virtual table with the wheel's own POSIX engine slot by slot; the round-trip tests are the
// second guard. Names mirror NIXL's so that the comparison can match method signatures.
#ifndef MEMKV_NIXL_ABI_H
#define MEMKV_NIXL_ABI_H

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

enum nixl_mem_t { DRAM_SEG = 0, VRAM_SEG = 1, BLK_SEG = 2, OBJ_SEG = 3, FILE_SEG = 4 };
enum nixl_xfer_op_t { NIXL_READ = 0, NIXL_WRITE = 1 };
enum nixl_status_t {
    NIXL_IN_PROG = 1, NIXL_SUCCESS = 0, NIXL_ERR_NOT_POSTED = -1, NIXL_ERR_INVALID_PARAM = -2,
    NIXL_ERR_BACKEND = -3, NIXL_ERR_NOT_FOUND = -4, NIXL_ERR_MISMATCH = -5,
    NIXL_ERR_NOT_ALLOWED = -6, NIXL_ERR_REPOST_ACTIVE = -7, NIXL_ERR_UNKNOWN = -8,
    NIXL_ERR_NOT_SUPPORTED = -9, NIXL_ERR_REMOTE_DISCONNECT = -10, NIXL_ERR_CANCELED = -11,
    NIXL_ERR_NO_TELEMETRY = -12,
};
enum class nixl_thread_sync_t : int { NIXL_THREAD_SYNC_NONE, NIXL_THREAD_SYNC_STRICT, NIXL_THREAD_SYNC_RW };
enum nixl_cost_t : int { NIXL_COST_ANALYTICAL_BACKEND = 0 };

using nixl_b_params_t = std::unordered_map<std::string, std::string>;
using nixl_mem_list_t = std::vector<nixl_mem_t>;
using nixl_query_resp_t = std::optional<nixl_b_params_t>;
using notif_list_t = std::vector<std::pair<std::string, std::string>>;
using nixl_blob_t = std::string;

class nixlBackendMD {
public:
    bool isPrivateMD;
    explicit nixlBackendMD(bool is_private) : isPrivateMD(is_private) {}
    virtual ~nixlBackendMD() = default;
};

class nixlBackendReqH {
public:
    nixlBackendReqH() = default;
    virtual ~nixlBackendReqH() = default;
};

class nixlBasicDesc {
public:
    uintptr_t addr;
    size_t len;
    uint64_t devId;
};

class nixlBlobDesc : public nixlBasicDesc {
public:
    nixl_blob_t metaInfo;
};

class nixlMetaDesc : public nixlBasicDesc {
public:
    nixlBackendMD *metadataP;
};

class nixlRemoteMetaDesc;     // only named in a default slot's signature
class nixlAgentOptionalArgs;  // likewise

// NIXL's descriptor list: a polymorphic object (vptr), its memory type, then the descriptors.
// NIXL constructs them; we only read them, through `descs`.
template <class T> class nixlDescList {
public:
    void *vptr_;
    nixl_mem_t type;
    std::vector<T> descs;

    int descCount() const { return (int)descs.size(); }
    nixl_mem_t getType() const { return type; }
    const T &operator[](int i) const { return descs[(size_t)i]; }
};

using nixl_meta_dlist_t = nixlDescList<nixlMetaDesc>;
using nixl_reg_dlist_t = nixlDescList<nixlBlobDesc>;
using nixl_remote_meta_dlist_t = nixlDescList<nixlRemoteMetaDesc>;

struct nixlBackendOptionalArgs {
    std::string notifMsg;
    bool hasNotif = false;
    std::string customParam;
};
using nixl_opt_b_args_t = nixlBackendOptionalArgs;

struct nixlBackendInitParams {
    std::string localAgent;
    std::string type;
    nixl_b_params_t *customParams;
    bool enableProgTh;
    uint64_t pthrDelay;  // microseconds
    nixl_thread_sync_t syncMode;
    bool enableTelemetry_;
};

// The engine base class. Data members and virtual functions in NIXL's declaration order.
class nixlBackendEngine {
private:
    const std::string backendType;
    nixl_b_params_t customParams;
    std::vector<unsigned char> telemetryEvents_;  // NIXL's event vector; never touched here
    std::mutex telemetryMutex_;

protected:
    bool initErr = false;
    const std::string localAgent;
    const bool enableTelemetry_;

public:
    explicit nixlBackendEngine(const nixlBackendInitParams *p)
        : backendType(p->type), customParams(*p->customParams), localAgent(p->localAgent),
          enableTelemetry_(p->enableTelemetry_) {}
    nixlBackendEngine(const nixlBackendEngine &) = delete;
    nixlBackendEngine &operator=(const nixlBackendEngine &) = delete;
    virtual ~nixlBackendEngine() = default;

    bool getInitErr() const { return initErr; }
    const nixl_b_params_t &getCustomParams() const { return customParams; }

    // slots 2..14: every engine implements these
    virtual bool supportsRemote() const = 0;
    virtual bool supportsLocal() const = 0;
    virtual bool supportsNotif() const = 0;
    virtual nixl_mem_list_t getSupportedMems() const = 0;
    virtual nixl_status_t registerMem(const nixlBlobDesc &mem, const nixl_mem_t &nixl_mem,
                                      nixlBackendMD *&out) = 0;
    virtual nixl_status_t deregisterMem(nixlBackendMD *meta) = 0;
    virtual nixl_status_t connect(const std::string &remote_agent) = 0;
    virtual nixl_status_t disconnect(const std::string &remote_agent) = 0;
    virtual nixl_status_t unloadMD(nixlBackendMD *input) = 0;
    virtual nixl_status_t prepXfer(const nixl_xfer_op_t &operation, const nixl_meta_dlist_t &local,
                                   const nixl_meta_dlist_t &remote, const std::string &remote_agent,
                                   nixlBackendReqH *&handle,
                                   const nixl_opt_b_args_t *opt_args = nullptr) const = 0;
    virtual nixl_status_t postXfer(const nixl_xfer_op_t &operation, const nixl_meta_dlist_t &local,
                                   const nixl_meta_dlist_t &remote, const std::string &remote_agent,
                                   nixlBackendReqH *&handle,
                                   const nixl_opt_b_args_t *opt_args = nullptr) const = 0;
    virtual nixl_status_t checkXfer(nixlBackendReqH *handle) const = 0;
    virtual nixl_status_t releaseReqH(nixlBackendReqH *handle) const = 0;

    // slots 15..26: defaults as in NIXL (NOT_SUPPORTED or BACKEND)
    virtual nixl_status_t prepMemView(const nixl_remote_meta_dlist_t &, void *&,
                                      const nixl_opt_b_args_t * = nullptr) const {
        return NIXL_ERR_NOT_SUPPORTED;
    }
    virtual nixl_status_t prepMemView(const nixl_meta_dlist_t &, void *&,
                                      const nixl_opt_b_args_t * = nullptr) const {
        return NIXL_ERR_NOT_SUPPORTED;
    }
    virtual void releaseMemView(void *) const {}
    virtual nixl_status_t getPublicData(const nixlBackendMD *, std::string &) const {
        return NIXL_ERR_BACKEND;
    }
    virtual nixl_status_t getConnInfo(std::string &) const { return NIXL_ERR_BACKEND; }
    virtual nixl_status_t loadRemoteConnInfo(const std::string &, const std::string &) {
        return NIXL_ERR_BACKEND;
    }
    virtual nixl_status_t loadRemoteMD(const nixlBlobDesc &, const nixl_mem_t &, const std::string &,
                                       nixlBackendMD *&) {
        return NIXL_ERR_BACKEND;
    }
    virtual nixl_status_t loadLocalMD(nixlBackendMD *, nixlBackendMD *&) { return NIXL_ERR_BACKEND; }
    virtual nixl_status_t getNotifs(notif_list_t &) { return NIXL_ERR_BACKEND; }
    virtual nixl_status_t genNotif(const std::string &, const std::string &) const {
        return NIXL_ERR_BACKEND;
    }
    virtual nixl_status_t queryMem(const nixl_reg_dlist_t &, std::vector<nixl_query_resp_t> &) const {
        return NIXL_ERR_NOT_SUPPORTED;
    }
    virtual nixl_status_t estimateXferCost(const nixl_xfer_op_t &, const nixl_meta_dlist_t &,
                                           const nixl_meta_dlist_t &, const std::string &,
                                           nixlBackendReqH *const &, std::chrono::microseconds &,
                                           std::chrono::microseconds &, nixl_cost_t &,
                                           const nixlAgentOptionalArgs * = nullptr) const {
        return NIXL_ERR_NOT_SUPPORTED;
    }
};

// What nixl_plugin_init returns (NIXL checks api_version == 1 only).
struct nixlBackendPlugin {
    int api_version;
    nixlBackendEngine *(*create_engine)(const nixlBackendInitParams *);
    void (*destroy_engine)(nixlBackendEngine *);
    const char *(*get_plugin_name)();
    const char *(*get_plugin_version)();
    nixl_b_params_t (*get_backend_options)();
    nixl_mem_list_t (*get_backend_mems)();
};

static_assert(sizeof(nixlBasicDesc) == 24 && sizeof(nixlMetaDesc) == 32, "descriptor layout");
static_assert(sizeof(nixlBackendInitParams) == 0x60, "init params layout");

#endif
