package storage

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
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
	// host is the host scope (hosts.go), empty for none; hostView opens
	// it without a lease.
	host     string
	hostView bool
	hostTTL  time.Duration
	// watchCache keeps a local copy of the root (etcd_cache.go).
	watchCache bool
}

func defaultEtcdOptions() etcdOptions {
	return etcdOptions{
		pageSize:       DefaultEtcdPageSize,
		maxTxnOps:      DefaultEtcdMaxTxnOps,
		requestTimeout: DefaultEtcdRequestTimeout,
		hostTTL:        DefaultHostTTL,
		watchCache:     etcdCacheDefault,
	}
}

// etcdCacheDefault opens every etcd store with WithWatchCache: the tests'
// switch (SNAPMETA_TEST_ETCD_CACHE=1), to run them all in that mode.
var etcdCacheDefault = false

// Defaults of the etcd engine. DefaultEtcdMaxTxnOps is etcd's own default
// for --max-txn-ops.
const (
	DefaultEtcdPageSize       = 1000
	DefaultEtcdMaxTxnOps      = 128
	DefaultEtcdRequestTimeout = 15 * time.Second
)

// WithPageSize sets how many keys WalkInfo and IDMap read per request; it
// bounds their memory. A range with more than 8 pages left after its first
// is read in one stream instead, whose chunks etcd sizes (up to about its
// --max-request-bytes each).
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
// fails with class Unavailable. Zero leaves only the caller's context; a
// negative timeout is refused (InvalidArgument).
func WithRequestTimeout(d time.Duration) EtcdOpt {
	return func(o *etcdOptions) error {
		if d < 0 {
			return fmt.Errorf("request timeout must not be negative: %w", errdefs.ErrInvalidArgument)
		}
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
	o := defaultEtcdOptions()
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	kv := clientv3.KV(cli.KV)
	if o.wrapKV != nil {
		kv = o.wrapKV(kv)
	}
	e := &etcdEngine{cli: cli, own: own, kv: kv, keys: newEtcdKeys(root), root: root, opts: o}
	if o.host != "" {
		e.keys = e.keys.forHost(o.host)
	}
	host, err := e.openScope(context.Background())
	if err != nil {
		return nil, err
	}
	e.host = host
	if o.watchCache {
		e.cache = newWatchCache(cli, kv, e.keys.prefix, clientv3.GetPrefixRangeEnd(e.keys.prefix), o.pageSize)
	}
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
	keys   etcdKeys // of the store's scope
	root   string
	opts   etcdOptions
	host   *etcdHost // nil without host scopes
	// unscopedChecked is set once a store without a host has found its
	// root is not host-scoped (checkUnscoped).
	unscopedChecked atomic.Bool
	// noStream is set once the server or a KV wrapper refused a
	// RangeStream: long scans then page to the end.
	noStream atomic.Bool

	// cache is the watch-fed copy of the root, nil without WithWatchCache;
	// lastWrite is the revision of the store's last commit, which its next
	// writable transaction's copy must have reached.
	cache     *watchCache
	lastWrite atomic.Int64

	// ids is this store's reserved block of IDs, shared by its
	// transactions.
	idMu sync.Mutex
	ids  etcdIDBlock
}

func (e *etcdEngine) begin(ctx context.Context, writable bool) (engineTx, error) {
	if err := e.checkUnscoped(ctx); err != nil {
		return nil, err
	}
	if writable && e.host.fenced() && e.host.expired.Load() {
		return nil, fmt.Errorf("host %q: %w", e.host.name, ErrHostExpired)
	}
	return &etcdTx{etcdTxState: &etcdTxState{e: e, writable: writable, reads: readSet{}}, keys: e.keys}, nil
}

// beginRetry starts a transaction at the revision of the lost commit,
// with the keys it read again then (see lostCommit).
func (e *etcdEngine) beginRetry(ctx context.Context, lost error) engineTx {
	var lc *lostCommit
	if !errors.As(lost, &lc) || lc.e != e {
		return nil
	}
	if e.cache != nil {
		// A copy as new as the revision the guards failed at has what
		// made them fail; without one in time, the retry reads etcd.
		t := &etcdTx{etcdTxState: &etcdTxState{e: e, writable: true, reads: readSet{}}, keys: e.keys}
		if err := t.readFromCopy(ctx, lc.rev); err != nil {
			return nil
		}
		if t.snap != nil {
			return t
		}
	}
	return &etcdTx{etcdTxState: &etcdTxState{e: e, writable: true, reads: readSet{}, rev: lc.rev, prefetched: lc.kvs, copyChosen: true}, keys: e.keys}
}

func (e *etcdEngine) close() error {
	e.closed.Store(true)
	if e.cache != nil {
		e.cache.close()
	}
	err := e.host.release()
	if e.own {
		err = errors.Join(err, e.cli.Close())
	}
	return err
}

// currentRevision asks etcd for its revision now: a linearizable read of
// one key's count.
func (e *etcdEngine) currentRevision(ctx context.Context) (int64, error) {
	var resp *clientv3.GetResponse
	err := e.call(ctx, func(ctx context.Context) (err error) {
		resp, err = e.kv.Get(ctx, e.keys.mode(), clientv3.WithCountOnly())
		return err
	})
	if err != nil {
		return 0, err
	}
	return resp.Header.Revision, nil
}

// noteWrite records a commit's revision as the store's last write.
func (e *etcdEngine) noteWrite(rev int64) {
	for {
		last := e.lastWrite.Load()
		if rev <= last || e.lastWrite.CompareAndSwap(last, rev) {
			return
		}
	}
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
