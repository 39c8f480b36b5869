package storage

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// EtcdOpt configures an etcd store.
type EtcdOpt func(*etcdOptions) error

type etcdOptions struct {
	pageSize       int64
	maxTxnOps      int
	requestTimeout time.Duration
	wrapKV         func(clientv3.KV) clientv3.KV
}

// Defaults of the etcd engine. DefaultEtcdMaxTxnOps is etcd's own default
// for --max-txn-ops.
const (
	DefaultEtcdPageSize       = 1000
	DefaultEtcdMaxTxnOps      = 128
	DefaultEtcdRequestTimeout = 15 * time.Second
)

// WithPageSize sets how many keys WalkInfo and IDMap read per request; it
// bounds their memory.
func WithPageSize(n int) EtcdOpt {
	return func(o *etcdOptions) error {
		if n <= 0 {
			return fmt.Errorf("page size must be positive: %w", errdefs.ErrInvalidArgument)
		}
		o.pageSize = int64(n)
		return nil
	}
}

// WithMaxTxnOps tells the store the server's --max-txn-ops, so that a
// transaction too large for it fails at Commit with ErrTooLarge before it is
// sent.
func WithMaxTxnOps(n int) EtcdOpt {
	return func(o *etcdOptions) error {
		if n <= 0 {
			return fmt.Errorf("max txn ops must be positive: %w", errdefs.ErrInvalidArgument)
		}
		o.maxTxnOps = n
		return nil
	}
}

// WithRequestTimeout bounds every etcd request; a request that takes longer
// fails with class Unavailable. Zero leaves only the caller's context.
func WithRequestTimeout(d time.Duration) EtcdOpt {
	return func(o *etcdOptions) error {
		o.requestTimeout = d
		return nil
	}
}

// WithKVWrapper wraps the clientv3.KV every request goes through (metrics,
// tracing, counting round trips).
func WithKVWrapper(wrap func(clientv3.KV) clientv3.KV) EtcdOpt {
	return func(o *etcdOptions) error {
		o.wrapKV = wrap
		return nil
	}
}

// NewEtcdStore connects to etcd with cfg and returns a store kept under the
// key prefix root (see keys.go). Every clientv3.Config setting (TLS,
// username and password, timeouts, ...) is used as given. The store owns the
// client and closes it on Close.
func NewEtcdStore(root string, cfg *clientv3.Config, opts ...EtcdOpt) (MetaStore, error) {
	if cfg == nil {
		return nil, fmt.Errorf("nil etcd client config: %w", errdefs.ErrInvalidArgument)
	}
	if err := checkRoot(root); err != nil {
		return nil, err
	}
	cli, err := clientv3.New(*cfg)
	if err != nil {
		return nil, fmt.Errorf("failed to create etcd client: %w", mapEtcdErr(err))
	}
	ms, err := newEtcdStore(cli, true, root, opts)
	if err != nil {
		_ = cli.Close()
		return nil, err
	}
	return ms, nil
}

// NewEtcdStoreFromClient returns a store kept under the key prefix root, on
// a client the caller owns: Close leaves the client open.
func NewEtcdStoreFromClient(cli *clientv3.Client, root string, opts ...EtcdOpt) (MetaStore, error) {
	if cli == nil {
		return nil, fmt.Errorf("nil etcd client: %w", errdefs.ErrInvalidArgument)
	}
	if err := checkRoot(root); err != nil {
		return nil, err
	}
	return newEtcdStore(cli, false, root, opts)
}

func newEtcdStore(cli *clientv3.Client, own bool, root string, opts []EtcdOpt) (MetaStore, error) {
	o := etcdOptions{
		pageSize:       DefaultEtcdPageSize,
		maxTxnOps:      DefaultEtcdMaxTxnOps,
		requestTimeout: DefaultEtcdRequestTimeout,
	}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	kv := clientv3.KV(cli.KV)
	if o.wrapKV != nil {
		kv = o.wrapKV(kv)
	}
	e := &etcdEngine{cli: cli, own: own, kv: kv, keys: newEtcdKeys(root), opts: o}
	return newMetaStore(e), nil
}

// checkRoot refuses roots that could overlap another store's keys.
func checkRoot(root string) error {
	if root == "" {
		return fmt.Errorf("etcd root must not be empty: %w", errdefs.ErrInvalidArgument)
	}
	if slices.Contains(strings.Split(root, "/"), KeyEtcdVersion) {
		return fmt.Errorf("etcd root %q must not contain the path element %q: %w", root, KeyEtcdVersion, errdefs.ErrInvalidArgument)
	}
	return nil
}

type etcdEngine struct {
	closed atomic.Bool // set by close: requests of live transactions fail with ErrClosed
	cli    *clientv3.Client
	own    bool
	kv     clientv3.KV
	keys   etcdKeys
	opts   etcdOptions

	// ids is this store's reserved block of IDs: [next, end).
	idMu    sync.Mutex
	idNext  uint64
	idLimit uint64
}

func (e *etcdEngine) begin(_ context.Context, writable bool) (engineTx, error) {
	return &etcdTx{e: e, writable: writable, seen: map[string]seenKey{}}, nil
}

func (e *etcdEngine) close() error {
	e.closed.Store(true)
	if e.own {
		return e.cli.Close()
	}
	return nil
}

// errRequestTimeout tells our request timeout from the caller's deadline.
var errRequestTimeout = errors.New("etcd request timeout")

// call runs one etcd request under the request timeout and maps its error.
func (e *etcdEngine) call(ctx context.Context, fn func(ctx context.Context) error) error {
	if e.closed.Load() {
		return ErrClosed
	}
	if d, ok := ctx.Deadline(); e.opts.requestTimeout > 0 && (!ok || time.Until(d) > e.opts.requestTimeout) {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, e.opts.requestTimeout, errRequestTimeout)
		defer cancel()
	}
	err := fn(ctx)
	if err == nil {
		return nil
	}
	if context.Cause(ctx) == errRequestTimeout {
		// Our own request timeout, not the caller's: the cluster did not
		// answer in time.
		return fmt.Errorf("etcd did not answer within %v: %w: %w", e.opts.requestTimeout, errdefs.ErrUnavailable, err)
	}
	return mapEtcdErr(err)
}

// mapEtcdErr gives an etcd or gRPC error its errdefs class.
func mapEtcdErr(err error) error {
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	case errors.Is(err, rpctypes.ErrCompacted):
		return fmt.Errorf("read revision compacted: %w: %w", ErrConflict, err)
	case errors.Is(err, rpctypes.ErrTooManyOps), errors.Is(err, rpctypes.ErrRequestTooLarge):
		return fmt.Errorf("%w: %w", ErrTooLarge, err)
	}
	// The etcd client turns the server's gRPC errors into
	// rpctypes.EtcdError, which status.Code does not see through; and etcd
	// reports failed logins as InvalidArgument.
	code := status.Code(err)
	if ee := (rpctypes.EtcdError{}); errors.As(err, &ee) {
		code = ee.Code()
	}
	if errors.Is(err, rpctypes.ErrAuthFailed) || errors.Is(err, rpctypes.ErrUserEmpty) || errors.Is(err, rpctypes.ErrInvalidAuthToken) {
		code = codes.Unauthenticated
	}
	var class error
	switch code {
	case codes.PermissionDenied:
		class = errdefs.ErrPermissionDenied
	case codes.Unauthenticated:
		class = errdefs.ErrUnauthenticated
	case codes.InvalidArgument:
		class = errdefs.ErrInvalidArgument
	case codes.ResourceExhausted:
		class = errdefs.ErrResourceExhausted
	case codes.DeadlineExceeded:
		return fmt.Errorf("etcd: %w: %w", context.DeadlineExceeded, err)
	case codes.Canceled:
		return fmt.Errorf("etcd: %w: %w", context.Canceled, err)
	default:
		class = errdefs.ErrUnavailable
	}
	return fmt.Errorf("etcd: %w: %w", class, err)
}

// etcdIDBlockSize is how many IDs a store reserves at a time. It is part of
// the layout: every client of a root must use the same size, or blocks
// would overlap.
const etcdIDBlockSize = 128

// reserveIDs takes a new block of IDs from the shared allocator in one round
// trip: the version of the block key numbers the blocks, the floor key
// (raised by imports) offsets them. See keys.go.
func (e *etcdEngine) reserveIDs(ctx context.Context) (uint64, uint64, error) {
	var resp *clientv3.TxnResponse
	err := e.call(ctx, func(ctx context.Context) (err error) {
		resp, err = e.kv.Txn(ctx).Then(
			clientv3.OpPut(e.keys.idBlock, "", clientv3.WithPrevKV()),
			clientv3.OpGet(e.keys.idFloor),
		).Commit()
		return err
	})
	if err != nil {
		return 0, 0, err
	}
	var block uint64
	if prev := resp.Responses[0].GetResponsePut().GetPrevKv(); prev != nil {
		block = uint64(prev.Version)
	}
	var floor uint64
	if kvs := resp.Responses[1].GetResponseRange().GetKvs(); len(kvs) > 0 {
		if floor, err = strconv.ParseUint(string(kvs[0].Value), 10, 64); err != nil {
			return 0, 0, fmt.Errorf("ID floor %q: %w", kvs[0].Value, ErrCorrupt)
		}
	}
	start := floor + block*etcdIDBlockSize + 1
	return start, start + etcdIDBlockSize, nil
}

// dropIDBlock forgets the reserved block, so the next ID comes from a new
// one.
func (e *etcdEngine) dropIDBlock() {
	e.idMu.Lock()
	defer e.idMu.Unlock()
	e.idNext = e.idLimit
}

func (e *etcdEngine) nextID(ctx context.Context) (uint64, error) {
	e.idMu.Lock()
	defer e.idMu.Unlock()
	if e.idNext == e.idLimit {
		start, limit, err := e.reserveIDs(ctx)
		if err != nil {
			return 0, err
		}
		e.idNext, e.idLimit = start, limit
	}
	id := e.idNext
	e.idNext++
	return id, nil
}

// seenKey is what a transaction read of one key: its mod revision (0 when
// absent) and value.
type seenKey struct {
	modRev int64
	value  []byte
}

// childPeek is a read of the first keys of a children prefix.
type childPeek struct {
	keys []seenKV
	more bool
}

type seenKV struct {
	key    string
	modRev int64
}

// etcdTx is an optimistic transaction: reads at one revision, buffered
// writes, and one guarded Txn at commit.
type etcdTx struct {
	e        *etcdEngine
	writable bool

	rev    int64              // read revision; 0 until the first read
	seen   map[string]seenKey // point reads, guarded by mod revision
	ranges map[string]string  // ranges read, guarded against any change since rev
	peeks  map[string]childPeek
	writes map[string][]byte // buffered writes; nil value deletes
	// wantChildren holds the names whose children check was announced, to
	// be read along with their records.
	wantChildren map[string]bool
}

// etcdMaxName is the longest name the etcd engine looks up; a longer one is
// absent without a request. This package writes no name over MaxNameSize,
// so only a hand-written key is longer; up to this bound such a record is
// still read and removed: Remove's transaction holds the name at most eight
// bytes for one (its key twice, the children range of its escaped name,
// up to three bytes for one, twice) and its parent's escaped name once,
// under 1 MiB in all, within etcd's default request limit of 1.5 MiB.
const etcdMaxName = 64 << 10

func (t *etcdTx) maxName() int { return etcdMaxName }

func (t *etcdTx) willCheckChildren(name string) {
	if t.wantChildren == nil {
		t.wantChildren = map[string]bool{}
	}
	t.wantChildren[name] = true
}

func (t *etcdTx) readOpts(opts ...clientv3.OpOption) []clientv3.OpOption {
	if t.rev != 0 {
		opts = append(opts, clientv3.WithRev(t.rev))
	}
	return opts
}

// pinRevision makes the first read's revision the transaction's.
func (t *etcdTx) pinRevision(rev int64) {
	if t.rev == 0 {
		t.rev = rev
	}
}

func (t *etcdTx) get(ctx context.Context, name string) (*record, error) {
	rs, err := t.getMany(ctx, lookupNames{name})
	return rs[0], err
}

func (t *etcdTx) getMany(ctx context.Context, names lookupNames) ([maxLookup]*record, error) {
	var out [maxLookup]*record
	var fetch []int
	for i, name := range names {
		if name == "" {
			continue
		}
		k := t.e.keys.snapshot(name)
		if v, ok := t.writes[k]; ok {
			if v == nil {
				continue
			}
			r, err := decodeRecord(v)
			if err != nil {
				return out, err
			}
			out[i] = r
			continue
		}
		if s, ok := t.seen[k]; ok {
			if s.value != nil {
				r, err := decodeRecord(s.value)
				if err != nil {
					return out, fmt.Errorf("snapshot %q: %w", name, err)
				}
				out[i] = r
			}
			continue
		}
		fetch = append(fetch, i)
	}
	if len(fetch) == 0 {
		return out, nil
	}
	// One request for every record, and for the children of any name whose
	// children check was announced, so that Remove costs one round trip.
	type read struct {
		name     string
		children bool
	}
	var reads []read
	var ops []clientv3.Op
	asked := map[string]bool{}
	for _, i := range fetch {
		if asked[names[i]] {
			continue // the same name twice, as CommitActive(key, key)
		}
		asked[names[i]] = true
		reads = append(reads, read{names[i], false})
		ops = append(ops, clientv3.OpGet(t.e.keys.snapshot(names[i]), t.readOpts()...))
		if t.wantChildren[names[i]] {
			reads = append(reads, read{names[i], true})
			ops = append(ops, clientv3.OpGet(t.e.keys.childPrefix(names[i]),
				t.readOpts(clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithLimit(1))...))
		}
	}
	results, err := t.readMany(ctx, ops)
	if err != nil {
		return out, err
	}
	for j, rd := range reads {
		rr := results[j]
		if rd.children {
			t.peek(rd.name, rr.Kvs, rr.More)
			continue
		}
		s := seenKey{}
		if len(rr.Kvs) > 0 {
			s = seenKey{modRev: rr.Kvs[0].ModRevision, value: rr.Kvs[0].Value}
			r, err := decodeRecord(s.value)
			if err != nil {
				return out, fmt.Errorf("snapshot %q: %w", rd.name, err)
			}
			for _, i := range fetch {
				if names[i] == rd.name {
					out[i] = r
				}
			}
		}
		t.seen[t.e.keys.snapshot(rd.name)] = s
	}
	return out, nil
}

// readMany sends reads in one round trip: a plain Get for one (cheaper for
// etcd than a transaction), a Txn of Gets for more, which etcd answers at
// one revision. The first read's revision becomes the transaction's.
func (t *etcdTx) readMany(ctx context.Context, ops []clientv3.Op) ([]*etcdserverpb.RangeResponse, error) {
	if len(ops) == 1 {
		var resp clientv3.OpResponse
		err := t.e.call(ctx, func(ctx context.Context) (err error) {
			resp, err = t.e.kv.Do(ctx, ops[0])
			return err
		})
		if err != nil {
			return nil, err
		}
		get := resp.Get()
		t.pinRevision(get.Header.Revision)
		return []*etcdserverpb.RangeResponse{(*etcdserverpb.RangeResponse)(get)}, nil
	}
	var resp *clientv3.TxnResponse
	err := t.e.call(ctx, func(ctx context.Context) (err error) {
		resp, err = t.e.kv.Txn(ctx).Then(ops...).Commit()
		return err
	})
	if err != nil {
		return nil, err
	}
	t.pinRevision(resp.Header.Revision)
	out := make([]*etcdserverpb.RangeResponse, len(resp.Responses))
	for i, r := range resp.Responses {
		out[i] = r.GetResponseRange()
	}
	return out, nil
}

func (t *etcdTx) peek(name string, kvs []*mvccpb.KeyValue, more bool) {
	if t.peeks == nil {
		t.peeks = map[string]childPeek{}
	}
	p := childPeek{more: more}
	for _, kv := range kvs {
		p.keys = append(p.keys, seenKV{key: string(kv.Key), modRev: kv.ModRevision})
	}
	t.peeks[name] = p
}

func (t *etcdTx) write(key string, value []byte) {
	if t.writes == nil {
		t.writes = map[string][]byte{}
	}
	t.writes[key] = value
}

func (t *etcdTx) put(name string, r *record) error {
	t.write(t.e.keys.snapshot(name), encodeRecord(r))
	return nil
}

func (t *etcdTx) delete(name string) error {
	t.write(t.e.keys.snapshot(name), nil)
	// Deleting leaves no key for a range compare to see; touching the
	// marker, which lies in the snapshots range, makes walkers conflict.
	t.write(t.e.keys.deleted, []byte{})
	return nil
}

func (t *etcdTx) link(parent, child ref) error {
	t.write(t.e.keys.child(parent.name, child.id), []byte(child.name))
	return nil
}

func (t *etcdTx) unlink(parent, child ref) error {
	t.write(t.e.keys.child(parent.name, child.id), nil)
	return nil
}

func (t *etcdTx) hasChildren(ctx context.Context, p ref) (bool, error) {
	prefix := t.e.keys.childPrefix(p.name)
	deleted := map[string]bool{}
	for k, v := range t.writes {
		if strings.HasPrefix(k, prefix) {
			if v != nil {
				return true, nil
			}
			deleted[k] = true
		}
	}
	peek, ok := t.peeks[p.name]
	for {
		if !ok || (peek.more && len(peek.keys) <= len(deleted)) {
			limit := int64(len(deleted) + 1)
			var resp *clientv3.GetResponse
			err := t.e.call(ctx, func(ctx context.Context) (err error) {
				resp, err = t.e.kv.Get(ctx, prefix, t.readOpts(clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithLimit(limit))...)
				return err
			})
			if err != nil {
				return false, err
			}
			t.pinRevision(resp.Header.Revision)
			t.peek(p.name, resp.Kvs, resp.More)
			peek, ok = t.peeks[p.name], true
		}
		for _, kv := range peek.keys {
			if !deleted[kv.key] {
				// Guard the child we saw: the answer holds while it does.
				t.seen[kv.key] = seenKey{modRev: kv.modRev}
				return true, nil
			}
		}
		if !peek.more {
			// Guard the whole prefix: a child added since rev conflicts.
			t.readRange(prefix, clientv3.GetPrefixRangeEnd(prefix))
			return false, nil
		}
		ok = false
	}
}

func (t *etcdTx) readRange(start, end string) {
	if t.ranges == nil {
		t.ranges = map[string]string{}
	}
	t.ranges[start] = end
}

func (t *etcdTx) scan(ctx context.Context, fn func(name string, r *record, err error) error) error {
	start, end := t.e.keys.snapshotRange()
	// The guard starts at the deletion marker, which sorts just before the
	// snapshots, so removals conflict with this walk too.
	t.readRange(t.e.keys.deleted, end)

	var pending []string // buffered writes in the range, in key order
	for k := range t.writes {
		if k >= start && k < end {
			pending = append(pending, k)
		}
	}
	slices.Sort(pending)
	emit := func(key string, value []byte) error {
		r, err := decodeRecord(value)
		return fn(key[len(start):], r, err)
	}
	flushBefore := func(key string, all bool) error {
		for len(pending) > 0 && (all || pending[0] < key) {
			k := pending[0]
			pending = pending[1:]
			if v := t.writes[k]; v != nil {
				if err := emit(k, v); err != nil {
					return err
				}
			}
		}
		return nil
	}

	err := t.scanRange(ctx, start, end, func(kv *mvccpb.KeyValue) error {
		key := string(kv.Key)
		if err := flushBefore(key, false); err != nil {
			return err
		}
		if _, mine := t.writes[key]; !mine {
			return emit(key, kv.Value)
		}
		// The buffered write of this key replaces what etcd holds.
		if len(pending) > 0 && pending[0] == key {
			pending = pending[1:]
			if v := t.writes[key]; v != nil {
				return emit(key, v)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return flushBefore("", true)
}

// layoutDamage is always nil: every key of the etcd layout is a record or
// an index entry of its own, whose damage scan and scanLinks report.
func (t *etcdTx) layoutDamage() error { return nil }

func (t *etcdTx) scanLinks(ctx context.Context, fn func(parent, child ref, err error) error) error {
	start := t.e.keys.prefix + KeyEtcdChildren + "/"
	t.readRange(start, clientv3.GetPrefixRangeEnd(start))
	return t.scanRange(ctx, start, clientv3.GetPrefixRangeEnd(start), func(kv *mvccpb.KeyValue) error {
		rest := string(kv.Key[len(start):])
		i := strings.LastIndexByte(rest, '/')
		var parent string
		var child uint64
		ok := i >= 0
		if ok {
			var err error
			parent, ok = unescapeName(rest[:i])
			child, err = strconv.ParseUint(rest[i+1:], 10, 64)
			// Only the key link writes is one: "07" would outlive unlink.
			ok = ok && err == nil && formatID(child) == rest[i+1:]
		}
		if !ok {
			return fn(ref{}, ref{name: string(kv.Value)}, fmt.Errorf("children key %q is not a link's: %w", kv.Key, ErrCorrupt))
		}
		return fn(ref{name: parent}, ref{name: string(kv.Value), id: child}, nil)
	})
}

// scanRange reads [start, end) from etcd in pages, every page at the
// transaction's revision. It neither sees buffered writes nor guards the
// range: callers do.
func (t *etcdTx) scanRange(ctx context.Context, start, end string, fn func(kv *mvccpb.KeyValue) error) error {
	for from := start; ; {
		var resp *clientv3.GetResponse
		err := t.e.call(ctx, func(ctx context.Context) (err error) {
			resp, err = t.e.kv.Get(ctx, from, t.readOpts(clientv3.WithRange(end), clientv3.WithLimit(t.e.opts.pageSize))...)
			return err
		})
		if err != nil {
			return err
		}
		t.pinRevision(resp.Header.Revision)
		for _, kv := range resp.Kvs {
			if err := fn(kv); err != nil {
				return err
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

func (t *etcdTx) idLimit(ctx context.Context) (uint64, error) {
	var resp *clientv3.TxnResponse
	err := t.e.call(ctx, func(ctx context.Context) (err error) {
		resp, err = t.e.kv.Txn(ctx).Then(
			clientv3.OpGet(t.e.keys.idBlock, t.readOpts()...),
			clientv3.OpGet(t.e.keys.idFloor, t.readOpts()...),
		).Commit()
		return err
	})
	if err != nil {
		return 0, err
	}
	t.pinRevision(resp.Header.Revision)
	var blocks, floor uint64
	if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) > 0 {
		blocks = uint64(kvs[0].Version)
	}
	if kvs := resp.Responses[1].GetResponseRange().GetKvs(); len(kvs) > 0 {
		if floor, err = strconv.ParseUint(string(kvs[0].Value), 10, 64); err != nil {
			return 0, fmt.Errorf("ID floor %q: %w", kvs[0].Value, ErrCorrupt)
		}
	}
	return floor + blocks*etcdIDBlockSize, nil
}

func (t *etcdTx) nextID(ctx context.Context) (uint64, error) { return t.e.nextID(ctx) }

// raiseIDs raises the floor of the ID blocks (see keys.go) in this
// transaction; the floor read is guarded like any other read.
func (t *etcdTx) raiseIDs(ctx context.Context, id uint64) error {
	k := t.e.keys.idFloor
	s, ok := t.seen[k]
	if !ok {
		var resp *clientv3.GetResponse
		err := t.e.call(ctx, func(ctx context.Context) (err error) {
			resp, err = t.e.kv.Get(ctx, k, t.readOpts()...)
			return err
		})
		if err != nil {
			return err
		}
		t.pinRevision(resp.Header.Revision)
		if len(resp.Kvs) > 0 {
			s = seenKey{modRev: resp.Kvs[0].ModRevision, value: resp.Kvs[0].Value}
		}
		t.seen[k] = s
	}
	floor := uint64(0)
	if v, buffered := t.writes[k]; buffered {
		s.value = v
	}
	if s.value != nil {
		var err error
		if floor, err = strconv.ParseUint(string(s.value), 10, 64); err != nil {
			return fmt.Errorf("ID floor %q: %w", s.value, ErrCorrupt)
		}
	}
	if id > floor {
		t.write(k, []byte(strconv.FormatUint(id, 10)))
		// This store's reserved block may lie below the new floor.
		t.e.dropIDBlock()
	}
	return nil
}

func (t *etcdTx) rollback() error {
	t.writes, t.seen, t.ranges, t.peeks = nil, nil, nil, nil
	return nil
}

func (t *etcdTx) commit(ctx context.Context) error {
	if len(t.writes) == 0 {
		return nil
	}
	var cmps []clientv3.Cmp
	for _, k := range slices.Sorted(maps.Keys(t.seen)) {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(k), "=", t.seen[k].modRev))
	}
	for _, start := range slices.Sorted(maps.Keys(t.ranges)) {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(start), "<", t.rev+1).WithRange(t.ranges[start]))
	}
	var ops []clientv3.Op
	for _, k := range slices.Sorted(maps.Keys(t.writes)) {
		if v := t.writes[k]; v != nil {
			ops = append(ops, clientv3.OpPut(k, string(v)))
		} else {
			ops = append(ops, clientv3.OpDelete(k))
		}
	}
	if n := max(len(cmps), len(ops)); n > t.e.opts.maxTxnOps {
		return fmt.Errorf("%d operations, etcd accepts %d per transaction: %w", n, t.e.opts.maxTxnOps, ErrTooLarge)
	}
	var resp *clientv3.TxnResponse
	err := t.e.call(ctx, func(ctx context.Context) (err error) {
		resp, err = t.e.kv.Txn(ctx).If(cmps...).Then(ops...).Commit()
		return err
	})
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		return fmt.Errorf("snapshot metadata changed since revision %d: %w", t.rev, ErrConflict)
	}
	return nil
}

// etcdKeys builds the keys of one root; see keys.go for the layout.
type etcdKeys struct {
	prefix  string
	deleted string
	idBlock string
	idFloor string
}

func newEtcdKeys(root string) etcdKeys {
	p := root + "/" + KeyEtcdVersion + "/"
	return etcdKeys{
		prefix:  p,
		deleted: p + KeyEtcdSnapshots,
		idBlock: p + KeyEtcdIDBlock,
		idFloor: p + KeyEtcdIDFloor,
	}
}

func (k etcdKeys) snapshot(name string) string { return k.prefix + KeyEtcdSnapshots + "/" + name }

func (k etcdKeys) snapshotRange() (string, string) {
	return k.prefix + KeyEtcdSnapshots + "/", k.prefix + KeyEtcdSnapshots + "0"
}

func (k etcdKeys) childPrefix(parent string) string {
	return k.prefix + KeyEtcdChildren + "/" + escapeName(parent) + "/"
}

func (k etcdKeys) child(parent string, child uint64) string {
	return k.childPrefix(parent) + formatID(child)
}

// escapeName makes a snapshot name one path element: '%' and '/' are
// percent-encoded, so no name reaches into another's children.
func escapeName(name string) string {
	if !strings.ContainsAny(name, "%/") {
		return name
	}
	var b strings.Builder
	for i := 0; i < len(name); i++ {
		switch c := name[i]; c {
		case '%':
			b.WriteString("%25")
		case '/':
			b.WriteString("%2F")
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// unescapeName inverts escapeName; it reports false for a string escapeName
// cannot have produced.
func unescapeName(s string) (string, bool) {
	if !strings.Contains(s, "%") {
		return s, !strings.Contains(s, "/")
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '/':
			return "", false
		case c != '%':
			b.WriteByte(c)
		case strings.HasPrefix(s[i:], "%25"):
			b.WriteByte('%')
			i += 2
		case strings.HasPrefix(s[i:], "%2F"):
			b.WriteByte('/')
			i += 2
		default:
			return "", false
		}
	}
	return b.String(), true
}

// recordVersion is the first byte of every etcd record.
const recordVersion = 1

// encodeRecord is the etcd record format, version 1: the version byte, then
// uvarint ID, kind byte, parent, parent chain, labels (sorted), created and
// updated (time.MarshalBinary), varint inodes and size. Strings and byte
// fields are uvarint length-prefixed; lists are uvarint count-prefixed.
func encodeRecord(r *record) []byte {
	b := make([]byte, 0, 64+len(r.Parent)+8*len(r.ParentIDs))
	b = append(b, recordVersion)
	b = binary.AppendUvarint(b, r.ID)
	b = append(b, byte(r.Kind))
	b = appendBytes(b, []byte(r.Parent))
	b = binary.AppendUvarint(b, uint64(len(r.ParentIDs)))
	for _, id := range r.ParentIDs {
		b = binary.AppendUvarint(b, id)
	}
	b = binary.AppendUvarint(b, uint64(len(r.Labels)))
	for _, k := range slices.Sorted(maps.Keys(r.Labels)) {
		b = appendBytes(b, []byte(k))
		b = appendBytes(b, []byte(r.Labels[k]))
	}
	for _, t := range []time.Time{r.Created, r.Updated} {
		tb, _ := t.MarshalBinary() // fails only for zone offsets of fractional minutes; ours are UTC
		b = appendBytes(b, tb)
	}
	b = binary.AppendVarint(b, r.Usage.Inodes)
	return binary.AppendVarint(b, r.Usage.Size)
}

func appendBytes(b, v []byte) []byte {
	return append(binary.AppendUvarint(b, uint64(len(v))), v...)
}

// recordDecoder reads a record; the first error sticks.
type recordDecoder struct {
	b   []byte
	err error
}

func (d *recordDecoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("bad %s: %w", what, ErrCorrupt)
	}
}

func (d *recordDecoder) uvarint(what string) uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *recordDecoder) varint(what string) int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

// count reads a list length, refusing one longer than the bytes left could
// hold (each element takes at least min bytes), so corrupt input cannot make
// decoding allocate without bound.
func (d *recordDecoder) count(what string, min int) int {
	n := d.uvarint(what)
	if d.err != nil || n > uint64(len(d.b)/min) {
		d.fail(what)
		return 0
	}
	return int(n)
}

func (d *recordDecoder) bytes(what string) []byte {
	n := d.uvarint(what)
	if d.err != nil || n > uint64(len(d.b)) {
		d.fail(what)
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

// decodeRecord parses encodeRecord's format. Corrupt input, trailing bytes
// and unknown versions give ErrCorrupt; it never panics.
func decodeRecord(b []byte) (*record, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("empty record: %w", ErrCorrupt)
	}
	if b[0] != recordVersion {
		return nil, fmt.Errorf("unknown record version %d: %w", b[0], ErrCorrupt)
	}
	d := &recordDecoder{b: b[1:]}
	r := &record{ID: d.uvarint("id")}
	if len(d.b) == 0 {
		d.fail("kind")
	} else {
		r.Kind, d.b = snapshots.Kind(d.b[0]), d.b[1:]
	}
	r.Parent = string(d.bytes("parent"))
	if n := d.count("parent chain", 1); n > 0 {
		r.ParentIDs = make([]uint64, n)
		for i := range r.ParentIDs {
			r.ParentIDs[i] = d.uvarint("parent chain")
		}
	}
	if n := d.count("labels", 2); n > 0 {
		r.Labels = make(map[string]string, n)
		for range n {
			k := string(d.bytes("label key"))
			r.Labels[k] = string(d.bytes("label value"))
		}
	}
	for _, t := range []*time.Time{&r.Created, &r.Updated} {
		if tb := d.bytes("timestamp"); d.err == nil {
			if err := t.UnmarshalBinary(tb); err != nil {
				d.fail("timestamp")
			}
			*t = t.UTC() // a zone this package never writes would not encode again
		}
	}
	r.Usage.Inodes = d.varint("inodes")
	r.Usage.Size = d.varint("size")
	if d.err == nil && len(d.b) != 0 {
		d.fail("record: trailing bytes")
	}
	if d.err != nil {
		return nil, d.err
	}
	return r, nil
}
