package storage

import (
	"os"
	"time"
)

// SetCloseTimeout shortens how long Close of ms waits for transactions in
// flight, for tests of a stuck one.
func SetCloseTimeout(ms MetaStore, d time.Duration) { ms.(*metaStore).closeTimeout = d }

// SNAPMETA_TEST_BOLT_PARALLEL=1 runs every test in parallel mode: every
// bbolt store opens as if WithParallelCallbacks were given.
func init() {
	if os.Getenv("SNAPMETA_TEST_BOLT_PARALLEL") == "1" {
		boltParallelDefault = true
	}
}

// ParallelCallbacks reports whether ms is a bbolt store in parallel mode.
func ParallelCallbacks(ms MetaStore) bool {
	e, ok := ms.(*metaStore).eng.(*boltEngine)
	return ok && e.par != nil
}

// ParallelByDefault reports whether this run opens every bbolt store in
// parallel mode (SNAPMETA_TEST_BOLT_PARALLEL=1).
func ParallelByDefault() bool { return boltParallelDefault }

// GroupCommits returns how many group commits a bbolt store in the default
// mode made, and how many members' shares they carried.
func GroupCommits(ms MetaStore) (commits, shares int64) {
	e := ms.(*metaStore).eng.(*boltEngine)
	return e.group.commits.Load(), e.group.shares.Load()
}

// GroupWaiting returns how many callers wait to join the group of a bbolt
// store in the default mode.
func GroupWaiting(ms MetaStore) int {
	return int(ms.(*metaStore).eng.(*boltEngine).group.waiting.Load())
}

// SetBeforeGroupCommit makes fn run before each group commit of a bbolt
// store in the default mode, after the group's lock is released; set it
// before the store is used.
func SetBeforeGroupCommit(ms MetaStore, fn func()) {
	ms.(*metaStore).eng.(*boltEngine).group.beforeCommit = fn
}
