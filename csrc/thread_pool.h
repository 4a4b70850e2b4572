// A small persistent thread pool for the C++ core (std::thread only: no OpenMP, so it never meets the
// libgomp that torch ships).
//
// Contract:
//   ThreadPool pool(num_threads);            // num_threads >= 1: the calling thread plus num_threads - 1 workers
//   pool.run(n_tasks, task);                 // calls task(i) exactly once for every i in [0, n_tasks), spread
//                                            // over the calling thread and the workers; returns when all are done
//   pool.set_num_threads(n) / num_threads()  // 1 <= n <= 1024, else std::invalid_argument
//   default_pool()                           // process-wide pool: LENVM_RT_NUM_THREADS if set, else
//                                            // min(hardware concurrency, 8)
// Tasks are claimed dynamically (any thread may run any task, in any order), so a task's result must not
// depend on which thread runs it. If tasks throw, run() still waits for every task and then rethrows the
// first exception. run() and set_num_threads() are serialised by a mutex, so several threads may call them;
// a task must not call run() or set_num_threads() on its own pool.
//
// Idle workers spin on the job word (with a pause hint) for 100 us, then sleep on a condition
// variable: back-to-back calls (a decode step makes ~120) do not pay a futex wake each, and an idle pool
// does not burn a core. The caller runs tasks itself and never waits for a sleeping worker to wake up.
//
// Lifetime: workers start on the first run() that can use them. The destructor (and shutdown()) stops and
// joins them; later run() calls execute inline on the caller. default_pool() is never freed, so a thread
// that still calls it during interpreter exit finds a valid (inline) pool; a static guard joins its workers
// when the process exits normally. After fork() the child's pool has lost its workers: it abandons their
// handles (without touching them) and starts new workers on demand.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace lenvm {

class ThreadPool {
public:
    using Task = std::function<void(std::int64_t)>;

    explicit ThreadPool(int num_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    void run(std::int64_t n_tasks, const Task& task);
    void set_num_threads(int num_threads);
    int num_threads() const;
    void shutdown();

    // fork() support for default_pool(): hold the run lock across fork, then forget the lost workers in
    // the child. Public so that pthread_atfork handlers can reach them.
    void before_fork();
    void after_fork_in_parent();
    void after_fork_in_child();

private:
    // Everything a worker touches lives here; after fork() the child abandons (leaks) the old state, whose
    // mutex may have been held by a worker that no longer exists.
    struct Shared {
        std::mutex wake_mutex;
        std::condition_variable wake_cv;
        std::atomic<bool> stop{false};
        // High 32 bits: job generation; low 32 bits: index of the next unclaimed task.
        std::atomic<std::uint64_t> job{0};
        std::atomic<std::int64_t> n_tasks{0};
        std::atomic<const Task*> task{nullptr};
        std::atomic<std::int64_t> completed{0};
        std::mutex error_mutex;
        std::exception_ptr error;
        // Handles of workers lost in fork(); only ever set on state that is being abandoned.
        std::vector<std::thread> threads_left_behind;
    };

    static void worker_loop(Shared* shared, std::uint32_t seen);
    static void claim_and_run(Shared& shared, std::uint32_t generation);
    void start_workers();
    void stop_workers();

    std::mutex run_mutex_;
    std::unique_ptr<Shared> shared_;
    std::vector<std::thread> workers_;
    std::atomic<int> num_threads_;
    bool closed_ = false;
    bool workers_lost_ = false;
};

// Default thread count: LENVM_RT_NUM_THREADS when it holds a positive integer, else min(hardware, 8).
int default_num_threads();

ThreadPool& default_pool();

// Self-check of the run() protocol: `jobs` back-to-back run() calls on a private pool of `num_threads`
// threads, with task counts drawn from [1, max_tasks] so that consecutive jobs differ. Each task records its
// index; a job is faulty when an index ran other than once or an index outside the job ran. Returns the
// number of faulty jobs (0 for a correct pool). Meant for tests: oversubscribed threads make the scheduler
// preempt workers at every point of the protocol.
std::int64_t pool_self_check(int num_threads, std::int64_t jobs, std::int64_t max_tasks);

}  // namespace lenvm
