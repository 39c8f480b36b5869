package storage

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
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

// SNAPMETA_TEST_ETCD_CACHE=1 runs every test with every etcd store opened
// as if WithWatchCache were given.
func init() {
	if os.Getenv("SNAPMETA_TEST_ETCD_CACHE") == "1" {
		etcdCacheDefault = true
	}
}

// WatchCached reports whether ms is an etcd store with a watch cache.
func WatchCached(ms MetaStore) bool {
	e, ok := ms.(*metaStore).eng.(*etcdEngine)
	return ok && e.cache != nil
}

// ParallelCallbacks reports whether ms is a bbolt store in parallel mode.
func ParallelCallbacks(ms MetaStore) bool {
	e, ok := ms.(*metaStore).eng.(*boltEngine)
	return ok && e.par != nil
}

// ParallelByDefault reports whether this run opens every bbolt store in
// parallel mode (SNAPMETA_TEST_BOLT_PARALLEL=1).
func ParallelByDefault() bool { return boltParallelDefault }

// WithoutWatchCache opens an etcd store without the watch cache even in a
// run that opens every store with it: for tests of the requests a store
// sends to etcd when it reads etcd itself.
func WithoutWatchCache() EtcdOpt {
	return func(o *etcdOptions) error {
		o.watchCache = false
		return nil
	}
}

// HoldWatchCache holds ms's watch cache back: no watch response is applied
// until release is called.
func HoldWatchCache(ms MetaStore) (release func()) {
	c := ms.(*metaStore).eng.(*etcdEngine).cache
	c.held.Lock()
	return c.held.Unlock
}

// CopyHolds reports whether the newest copy of ms's watch cache holds a
// record named name.
func CopyHolds(ms MetaStore, name string) bool {
	e := ms.(*metaStore).eng.(*etcdEngine)
	s, _ := e.cache.state()
	if s == nil {
		return false
	}
	_, ok := s.tree.Get(&cachedKV{key: e.keys.snapshot(name)})
	return ok
}

// WaitWatchCache waits until ms's watch cache holds a copy of its root (the
// first list has been read), or ctx ends.
func WaitWatchCache(ctx context.Context, ms MetaStore) error {
	c := ms.(*metaStore).eng.(*etcdEngine).cache
	for {
		s, changed := c.state()
		if s != nil {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// WaitWatchCacheCurrent waits until ms's watch cache holds a copy complete
// up to etcd's revision now, so that a test counting requests does not
// count a fallback to etcd on a machine too busy to deliver the watch
// within cacheWait. It asks etcd through the client, not the store's KV.
func WaitWatchCacheCurrent(ctx context.Context, ms MetaStore) error {
	e := ms.(*metaStore).eng.(*etcdEngine)
	resp, err := e.cli.Get(ctx, e.keys.mode(), clientv3.WithCountOnly())
	if err != nil {
		return err
	}
	for {
		reached, live, changed := e.cache.reached()
		if live && reached >= resp.Header.Revision {
			return nil
		}
		select {
		case <-changed:
		case <-time.After(100 * time.Millisecond):
			// Ask again: a root that saw no write since reaches the
			// revision only by a progress notification.
			_ = e.cli.RequestProgress(e.cache.streamCtx)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// CopyDiff compares the newest copy of ms's watch cache with what etcd held
// at the copy's revision, key by key (value, create and mod revisions,
// version), and describes every difference.
func CopyDiff(ctx context.Context, ms MetaStore) ([]string, error) {
	e := ms.(*metaStore).eng.(*etcdEngine)
	c := e.cache
	s, _ := c.state()
	if s == nil {
		return nil, errors.New("no copy")
	}
	resp, err := e.cli.Get(ctx, c.start, clientv3.WithRange(c.end), clientv3.WithRev(s.rev))
	if err != nil {
		return nil, err
	}
	var diff []string
	seen := map[string]bool{}
	for _, kv := range resp.Kvs {
		seen[string(kv.Key)] = true
		got, ok := s.tree.Get(&cachedKV{key: string(kv.Key)})
		switch {
		case !ok:
			diff = append(diff, fmt.Sprintf("%s: missing from the copy", kv.Key))
		case string(got.value) != string(kv.Value) || got.create != kv.CreateRevision || got.mod != kv.ModRevision || got.version != kv.Version:
			diff = append(diff, fmt.Sprintf("%s: copy create %d mod %d version %d, etcd %d %d %d", kv.Key, got.create, got.mod, got.version, kv.CreateRevision, kv.ModRevision, kv.Version))
		}
	}
	s.tree.Ascend(func(kv *cachedKV) bool {
		if !seen[kv.key] {
			diff = append(diff, fmt.Sprintf("%s: in the copy only", kv.key))
		}
		return true
	})
	return diff, nil
}

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
// while no write transaction runs (committing groups read it unlocked).
func SetBeforeGroupCommit(ms MetaStore, fn func()) {
	ms.(*metaStore).eng.(*boltEngine).group.beforeCommit = fn
}

// SetIDSpillFile makes Check spill IDs to the file create returns rather
// than to a temporary file of its own; restore undoes it.
func SetIDSpillFile(create func() (*os.File, error)) (restore func()) {
	old := createIDSpill
	createIDSpill = create
	return func() { createIDSpill = old }
}

// ShrinkCheckBounds makes Check judge records two at a time, keep two
// records looked up and two verdicts, and spill IDs in runs of two, so
// that small stores take every path of a large one; restore undoes it.
func ShrinkCheckBounds() (restore func()) {
	batch, near, reach, run := checkBatch, nearCap, reachCap, idRunLen
	checkBatch, nearCap, reachCap, idRunLen = 2, 2, 2, 2
	return func() { checkBatch, nearCap, reachCap, idRunLen = batch, near, reach, run }
}
