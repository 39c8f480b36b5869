package storage

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/google/btree"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// The watch-fed cache (WithWatchCache).
//
// One goroutine per store lists the root's keys at one revision and then
// follows a watch from the next, applying every event to a B-tree. A
// transaction reads an immutable copy of the tree (a copy-on-write clone,
// made when one is first asked for after a change) tagged with the
// revision it is complete up to: a consistent state of the root at
// that revision, exactly what etcd would answer to reads at it. So every
// read is noted and guarded as if etcd had answered it, and a copy that is
// behind etcd can make a commit lose its guards (a conflict, retried by
// WithTransaction) but never commit a wrong write.
//
// What a copy is complete up to: the revision of the last event applied, or
// the revision of a progress notification (etcd sends those only to a
// watcher that has been sent every event up to it). The header revision of
// an event response is not used: a watcher catching up is sent a batch of
// events with the store's current revision, more batches to follow.

// WithWatchCache makes the store keep a local copy of its root, fed by an
// etcd watch, and read from it:
//
//   - A writable transaction reads the newest copy, at least as new as the
//     store's own last commit, without a request, and sends one guarded Txn
//     at Commit. A copy that is behind etcd can only make the commit
//     conflict; WithTransaction then runs the callback again on a copy at
//     least as new as the revision the conflict was seen at.
//   - A refusal (NotFound, AlreadyExists, InvalidArgument,
//     FailedPrecondition, ErrIDsExhausted) computed from the copy in a
//     writable transaction is checked against etcd, by a Txn of the
//     transaction's guards alone, before it is returned. If the copy was
//     stale, an operation that was the transaction's first runs again on
//     what etcd holds; a later one returns a Conflict (and WithTransaction
//     runs the callback again). A writable transaction that commits without
//     writes is checked the same way. So every answer is one a serial store
//     could give at the moment it is returned.
//   - A read-only transaction asks etcd for its current revision (one
//     linearizable request), waits until the copy has reached it (asking
//     etcd for a progress notification when the root saw no write since),
//     and then reads locally: walks of any size cost that one request.
//
// A transaction waits at most 50 ms for the copy it needs; past that, and
// while the watch is broken (compaction, lost leader, a closed connection),
// it reads etcd as without the cache, and a broken or stuck watch is
// listed again in the background. The copy holds every key of the root, so
// it costs client memory in proportion to the store (docs/benchmarks.md
// gives the figure per snapshot), and etcd sends every write of the root to
// every cached client.
func WithWatchCache() EtcdOpt {
	return func(o *etcdOptions) error {
		o.watchCache = true
		return nil
	}
}

// cacheWait bounds how long a transaction waits for the copy to reach the
// revision it needs before it reads etcd directly instead: a watch
// delivers a commit within a millisecond or so, and one that lags (a
// client starved of CPU, a busy server) must not stall its transactions.
// A copy that has not changed at all for cacheStuck while etcd was asked
// for a newer revision is taken for a stuck watch, which is restarted.
const (
	cacheWait  = 50 * time.Millisecond
	cacheStuck = 2 * time.Second
)

// cachedKV is one key of the copy, with the revisions etcd reports for it.
// It is never changed once in a tree: an event replaces it.
type cachedKV struct {
	key     string
	value   []byte
	create  int64
	mod     int64
	version int64
}

func cachedKVLess(a, b *cachedKV) bool { return a.key < b.key }

// cacheState is one copy of the root, complete up to rev. Its
// tree is never written.
type cacheState struct {
	rev  int64
	tree *btree.BTreeG[*cachedKV]
}

// watchCache follows one root.
type watchCache struct {
	cli        *clientv3.Client
	kv         clientv3.KV
	start, end string // the root's key range
	page       int64

	// mu guards the live tree, which the watch writes, complete up to
	// rev (nil when no copy can be trusted: before the first list, and
	// from a broken watch until the next list); cur, the copy of it
	// transactions read (nil until one asks); and changed, closed and
	// replaced whenever they change.
	mu        sync.Mutex
	tree      *btree.BTreeG[*cachedKV]
	rev       int64
	cur       *cacheState
	changed   chan struct{}
	changedAt time.Time

	// asking is set while a progress request is outstanding, so that
	// concurrent readers ask once.
	asking atomic.Bool
	// held is locked while a watch response is applied;
	// tests lock it to hold the copy back.
	held sync.Mutex

	streamCtx context.Context // carries the watch stream's metadata
	cancel    context.CancelFunc
	// stopFollowing ends the watch being followed (nil between watches),
	// for a copy found lagging: the cache lists again.
	stopFollowing context.CancelFunc
	done          chan struct{}
}

// degree of the B-tree: wide nodes keep it shallow; a clone's first write
// copies one node per level.
const cacheTreeDegree = 32

func newWatchCache(cli *clientv3.Client, kv clientv3.KV, start, end string, page int64) *watchCache {
	ctx, cancel := context.WithCancel(context.Background())
	c := &watchCache{
		cli: cli, kv: kv, start: start, end: end, page: page,
		changed: make(chan struct{}), changedAt: time.Now(),
		// The watch and the progress requests must share a stream: the
		// client picks the stream by the context's metadata.
		streamCtx: clientv3.WithRequireLeader(ctx),
		cancel:    cancel,
		done:      make(chan struct{}),
	}
	go c.run()
	return c
}

// close stops the watch and waits for its goroutine.
func (c *watchCache) close() {
	c.cancel()
	<-c.done
}

// run lists and follows until the cache is closed; a broken watch is
// followed by a new list, after a short pause when it failed at once.
func (c *watchCache) run() {
	defer close(c.done)
	pause := 10 * time.Millisecond
	for c.streamCtx.Err() == nil {
		rev, tree, err := c.list(c.streamCtx)
		if err == nil {
			c.install(rev, tree)
			started := time.Now()
			err = c.follow(rev)
			if time.Since(started) > time.Second {
				pause = 10 * time.Millisecond
			}
		}
		c.install(0, nil)
		if err != nil && c.streamCtx.Err() == nil {
			select {
			case <-c.streamCtx.Done():
			case <-time.After(pause):
			}
			pause = min(2*pause, time.Second)
		}
	}
}

// list reads the whole root at one revision, in pages.
func (c *watchCache) list(ctx context.Context) (int64, *btree.BTreeG[*cachedKV], error) {
	tree := btree.NewG(cacheTreeDegree, cachedKVLess)
	var rev int64
	for from := c.start; ; {
		opts := []clientv3.OpOption{clientv3.WithRange(c.end), clientv3.WithLimit(c.page)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := c.kv.Get(ctx, from, opts...)
		if err != nil {
			return 0, nil, err
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			tree.ReplaceOrInsert(cachedOf(kv))
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return rev, tree, nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

func cachedOf(kv *mvccpb.KeyValue) *cachedKV {
	return &cachedKV{key: string(kv.Key), value: kv.Value, create: kv.CreateRevision, mod: kv.ModRevision, version: kv.Version}
}

// errWatchEnded is why follow returns when etcd closes the watch without
// saying why.
var errWatchEnded = errors.New("etcd closed the watch")

// follow applies the watch's events from rev+1 on, until the watch breaks.
func (c *watchCache) follow(rev int64) error {
	ctx, cancel := context.WithCancel(c.streamCtx)
	defer cancel()
	c.mu.Lock()
	c.stopFollowing = cancel
	c.mu.Unlock()
	wch := c.cli.Watch(ctx, c.start, clientv3.WithRange(c.end), clientv3.WithRev(rev+1), clientv3.WithProgressNotify())
	for resp := range wch {
		if err := resp.Err(); err != nil {
			return err
		}
		c.held.Lock()
		c.apply(resp)
		c.held.Unlock()
	}
	if err := c.streamCtx.Err(); err != nil {
		return err
	}
	return errWatchEnded
}

// apply applies one watch response to the live tree.
func (c *watchCache) apply(resp clientv3.WatchResponse) {
	if resp.IsProgressNotify() {
		c.asking.Store(false)
	} else if len(resp.Events) == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if resp.IsProgressNotify() {
		if resp.Header.Revision <= c.rev {
			return
		}
		c.rev = resp.Header.Revision
		if c.cur != nil {
			// Nothing changed up to the new revision: the same tree.
			c.cur = &cacheState{rev: c.rev, tree: c.cur.tree}
		}
	} else {
		applied := c.rev
		for _, ev := range resp.Events {
			if ev.Kv.ModRevision <= applied {
				continue // the store's own commit, applied already (applyOwn)
			}
			if ev.Type == mvccpb.DELETE {
				c.tree.Delete(&cachedKV{key: string(ev.Kv.Key)})
			} else {
				c.tree.ReplaceOrInsert(cachedOf(ev.Kv))
			}
			c.rev = max(c.rev, ev.Kv.ModRevision)
		}
		c.cur = nil
	}
	c.changedLocked()
}

// applyOwn applies the writes of the store's own commit, at rev, to the
// live tree when the tree is complete up to the revision before it: the
// state at rev is then the tree with these writes, and the store's next
// transaction need not wait for the watch to bring them. Otherwise the
// watch will.
func (c *watchCache) applyOwn(rev int64, writes map[string][]byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.tree == nil || c.rev != rev-1 {
		return
	}
	for k, v := range writes {
		if k < c.start || k >= c.end {
			continue
		}
		if v == nil {
			c.tree.Delete(&cachedKV{key: k})
			continue
		}
		kv := &cachedKV{key: k, value: v, create: rev, mod: rev, version: 1}
		if old, ok := c.tree.Get(&cachedKV{key: k}); ok {
			kv.create, kv.version = old.create, old.version+1
		}
		c.tree.ReplaceOrInsert(kv)
	}
	c.rev, c.cur = rev, nil
	c.changedLocked()
}

// install makes tree, complete up to rev, the live tree; a nil tree
// withdraws the copy (transactions read etcd until the next list).
func (c *watchCache) install(rev int64, tree *btree.BTreeG[*cachedKV]) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.rev, c.tree, c.cur = rev, tree, nil
	if tree == nil {
		c.asking.Store(false)
	}
	c.changedLocked()
}

// changedLocked wakes the transactions waiting for a newer copy.
func (c *watchCache) changedLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
	c.changedAt = time.Now()
}

// reached returns the revision the live tree is complete up to, whether
// there is one, and the channel closed when that changes.
func (c *watchCache) reached() (int64, bool, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rev, c.tree != nil, c.changed
}

// unchangedFor is how long the live tree has not changed.
func (c *watchCache) unchangedFor() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Since(c.changedAt)
}

// relist ends the watch being followed; the cache lists again.
func (c *watchCache) relist() {
	c.mu.Lock()
	stop := c.stopFollowing
	c.mu.Unlock()
	if stop != nil {
		stop()
	}
}

// state returns the newest copy and the channel closed when it changes.
// The copy is a lazy clone of the live tree, made when a transaction first
// asks for the tree as it is: events applied while nobody reads cost no
// copying.
func (c *watchCache) state() (*cacheState, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.tree != nil && c.cur == nil {
		c.cur = &cacheState{rev: c.rev, tree: c.tree.Clone()}
	}
	return c.cur, c.changed
}

// at returns a copy complete up to rev or later, waiting for it at most
// cacheWait; nil when there is none (the caller reads etcd). When progress
// is true and the copy does not reach rev by events, it asks etcd for a
// progress notification: the root may have seen no write since.
func (c *watchCache) at(ctx context.Context, rev int64, progress bool) (*cacheState, error) {
	var timeout <-chan time.Time
	for {
		reached, live, changed := c.reached()
		if !live {
			return nil, nil
		}
		if reached >= rev {
			// Cloned only now: waiting on every event would clone each
			// time, and make the watch copy nodes for every write.
			if s, _ := c.state(); s != nil && s.rev >= rev {
				return s, nil
			}
			continue
		}
		if progress && c.asking.CompareAndSwap(false, true) {
			if err := c.cli.RequestProgress(c.streamCtx); err != nil {
				c.asking.Store(false)
				return nil, nil
			}
		}
		if timeout == nil {
			t := time.NewTimer(cacheWait)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-timeout:
			if progress && c.unchangedFor() > cacheStuck {
				// etcd was asked for the revision and the copy has
				// not moved since long before: the watch is stuck.
				c.relist()
			}
			return nil, nil
		}
	}
}

// answer reads op from the copy, as etcd would answer it at s.rev; ok is
// false for a request the copy cannot answer (a key outside the root, or
// options the transactions never use), which goes to etcd at s.rev.
// Count is the number of keys returned, not of the rest of the range, so a
// scan of the copy goes on in pages and never streams (see scanRange).
func (c *watchCache) answer(s *cacheState, op clientv3.Op) (*etcdserverpb.RangeResponse, bool) {
	if !op.IsGet() || (op.Rev() != 0 && op.Rev() != s.rev) || op.IsSortSet() || op.IsCountOnly() ||
		op.MinModRev() != 0 || op.MaxModRev() != 0 || op.MinCreateRev() != 0 || op.MaxCreateRev() != 0 {
		return nil, false
	}
	key, end := string(op.KeyBytes()), string(op.RangeBytes())
	if key < c.start || key >= c.end || (end != "" && (end == "\x00" || end > c.end)) {
		return nil, false
	}
	resp := &etcdserverpb.RangeResponse{Header: &etcdserverpb.ResponseHeader{Revision: s.rev}}
	if end == "" {
		if kv, ok := s.tree.Get(&cachedKV{key: key}); ok {
			resp.Kvs = []*mvccpb.KeyValue{kv.out(op.IsKeysOnly())}
		}
		resp.Count = int64(len(resp.Kvs))
		return resp, true
	}
	limit := op.Limit()
	s.tree.AscendRange(&cachedKV{key: key}, &cachedKV{key: end}, func(kv *cachedKV) bool {
		if limit > 0 && int64(len(resp.Kvs)) == limit {
			resp.More = true
			return false
		}
		resp.Kvs = append(resp.Kvs, kv.out(op.IsKeysOnly()))
		return true
	})
	resp.Count = int64(len(resp.Kvs))
	return resp, true
}

// out is kv as etcd returns it; the value is shared, and read only.
func (kv *cachedKV) out(keysOnly bool) *mvccpb.KeyValue {
	out := &mvccpb.KeyValue{Key: []byte(kv.key), CreateRevision: kv.create, ModRevision: kv.mod, Version: kv.version}
	if !keysOnly {
		out.Value = kv.value
	}
	return out
}

// Transactions on the copy.

// readCopy answers ops from the transaction's copy. Every read of a
// transaction is one the copy answers (a range of the root); one it could
// not would have to be read at the copy's revision, which a request built
// before the copy was chosen does not carry, so it is an internal error
// rather than a read at another revision.
func (t *etcdTx) readCopy(ops []clientv3.Op) ([]*etcdserverpb.RangeResponse, error) {
	t.confirmed = false
	out := make([]*etcdserverpb.RangeResponse, len(ops))
	for i, op := range ops {
		r, ok := t.e.cache.answer(t.snap, op)
		if !ok {
			return nil, fmt.Errorf("the watch cache cannot answer a read of %q: %w", op.KeyBytes(), errdefs.ErrInternal)
		}
		out[i] = r
	}
	return out, nil
}

// readFromCopy sets the transaction to read the cache's copy, from its
// start: a writable one the newest copy, at least as new as need and as
// the store's last commit; a read-only one a copy at least as new as etcd's
// revision now, which it asks for. The choice is made at the transaction's
// first read, so that one that reads nothing asks nothing. Without a copy
// in time it reads etcd.
func (t *etcdTx) readFromCopy(ctx context.Context, need int64) error {
	t.copyChosen = true
	c := t.e.cache
	if c == nil || t.rev != 0 {
		// A transaction that read etcd already goes on reading it at
		// that revision.
		return nil
	}
	if t.writable {
		// The store's own commits are events of the root; a revision the
		// root may have seen no event at (need, a lost commit's) may take
		// a progress notification.
		s, err := c.at(ctx, max(need, t.e.lastWrite.Load()), need != 0)
		if err != nil || s == nil {
			return err
		}
		t.snap, t.rev = s, s.rev
		return nil
	}
	rev, err := t.e.currentRevision(ctx)
	if err != nil {
		return err
	}
	s, err := c.at(ctx, rev, true)
	if err != nil || s == nil {
		// Without a copy the first read pins the transaction's revision,
		// as without the cache: it is read after rev was etcd's, so it is
		// at least as new. (Pinning rev here would not do: the requests
		// of the first read were built before, without a revision.)
		return err
	}
	t.snap, t.rev = s, s.rev
	return nil
}

// unconfirmed tells whether the transaction's answers so far came from a
// copy that may be behind etcd and were not confirmed since: a writable
// transaction's, which asked etcd nothing.
func (t *etcdTx) unconfirmed() bool {
	return t.snap != nil && t.writable && !t.confirmed && (len(t.reads) > 0 || len(t.ranges) > 0)
}

// readNothing tells whether the transaction has read and written nothing
// yet: an operation refused on a stale copy may then run again on a newer
// one.
func (t *etcdTx) readNothing() bool {
	return len(t.reads) == 0 && len(t.ranges) == 0 && len(t.peeks) == 0 && len(t.writes) == 0 && !t.blocksRead
}

// checkRefusal confirms, before an operation's refusal is returned, that
// what the transaction read from the copy still holds in etcd: a Txn of its
// guards alone. When it does not, the refusal may be wrong: an operation
// that was the transaction's first runs again (rerun) from a copy with what
// failed the guards, a few times at most; otherwise a Conflict is returned
// (and WithTransaction runs the callback again).
func (t *etcdTx) checkRefusal(ctx context.Context, refusal error, rerun func() error) error {
	for tries := 0; ; tries++ {
		if !t.unconfirmed() {
			return refusal
		}
		err := t.send(ctx, false)
		if err == nil {
			t.confirmed = true
			return refusal
		}
		var lc *lostCommit
		if rerun == nil || tries == 2 || !errors.As(err, &lc) {
			return err
		}
		*t.etcdTxState = etcdTxState{e: t.e, writable: t.writable, reads: readSet{}}
		if err := t.readFromCopy(ctx, lc.rev); err != nil {
			return err
		}
		if refusal = rerun(); !refused(refusal) {
			return refusal
		}
	}
}
