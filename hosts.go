package storage

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Host scopes: many containerd daemons on one etcd root.
//
// containerd owns everything its snapshotter holds: it names backend
// snapshots "<namespace>/<counter>/<key>" with a counter of its own, and its
// garbage collector removes every snapshot its metadata does not name. A
// root shared by several daemons therefore gives each host a scope in which
// it is alone: a store opened WithHost sees and changes only the names of
// its host's scope, with every rule of a private store, while IDs come from
// the root's one allocator, so drivers on a shared data directory never
// collide. Scopes share only what is safe to share: committed layers bound
// into several scopes (share.go), and active snapshots taken over from a
// host that is gone (takeover.go).
//
// A root is host-scoped from the first store opened WithHost on it, and
// only if it held no snapshots then; a root that is not host-scoped serves
// exactly one containerd.

// DefaultHostTTL is the TTL of a host's lease unless WithHostTTL sets
// another: how long after its last keep-alive a host that vanished (a crash,
// a cut network) counts as alive.
const DefaultHostTTL = 10 * time.Second

// maxHostName bounds a host identity; see validHost.
const maxHostName = 128

// modeHosts is the value of the mode key of a host-scoped root.
const modeHosts = "hosts"

var (
	// ErrScopeMismatch is returned when a store's host scoping does not
	// match its root's (class FailedPrecondition), and nothing is written:
	// by NewEtcdStore WithHost when the root holds snapshots without host
	// scopes; to a store without host on a host-scoped root, by its first
	// transaction (NewEtcdStore reads nothing of the root then), and,
	// should the root become host-scoped later (it held no snapshots then),
	// by its next commit, which applies nothing.
	ErrScopeMismatch = fmt.Errorf("etcd root scoping does not match: %w", errdefs.ErrFailedPrecondition)

	// ErrHostAlive is returned by NewEtcdStore WithHost while another
	// store of the same host holds the host's lease, and by TakeOver of a
	// snapshot whose owner is alive (class FailedPrecondition). Nothing is
	// changed. A store closed cleanly releases its lease at once; one that
	// vanished holds it until its TTL runs out.
	ErrHostAlive = fmt.Errorf("host is alive: %w", errdefs.ErrFailedPrecondition)

	// ErrHostExpired is returned when the lease of a store opened WithHost
	// has expired (its keep-alives did not reach etcd within the TTL):
	// other hosts may have taken over its active snapshots since, so the
	// store refuses every writable transaction from then on, and a commit
	// that was in flight is not applied (class FailedPrecondition). Reads
	// go on. Open the store again to go on writing.
	ErrHostExpired = fmt.Errorf("host lease expired; reopen the store: %w", errdefs.ErrFailedPrecondition)

	// ErrNotScoped is returned by the functions of host scopes (TakeOver,
	// BindLayer, CommitShared, ...) on a transaction of a store that was
	// not opened WithHost or WithHostView: a bbolt store, an etcd store
	// without host scopes, or another package's Transactor (class
	// NotImplemented). Nothing is changed.
	ErrNotScoped = fmt.Errorf("store has no host scopes: %w", errdefs.ErrNotImplemented)
)

// WithHost opens the root as the scope of host: the store sees and changes
// only the snapshots of that host, and holds a lease, kept alive while the
// store is open, that tells other hosts it is alive (see KeyLock). Opening
// fails with ErrHostAlive while another store of host is alive, and with
// ErrScopeMismatch on a root that holds snapshots without host scopes. A
// host is 1 to 128 bytes of letters, digits and ".-_:" (a hostname, a
// machine ID, a UUID).
//
// Every commit of the store is fenced by its lease: once the lease has
// expired no commit of the store is applied (ErrHostExpired), so a host
// that was cut off never writes over a takeover.
func WithHost(host string) EtcdOpt {
	return func(o *etcdOptions) error {
		if err := validHost(host); err != nil {
			return err
		}
		o.host, o.hostView = host, false
		return nil
	}
}

// WithHostView opens the scope of host as an operator does: the store sees
// and changes the host's snapshots like WithHost, but holds no lease, so
// the host's liveness is untouched and no commit is fenced. It is for
// tools (snapmeta) that inspect or repair a host-scoped root. The root must
// be host-scoped already (ErrScopeMismatch otherwise) and list the host: a
// host that never opened it WithHost, or that ReleaseHost forgot, is
// NotFound.
func WithHostView(host string) EtcdOpt {
	return func(o *etcdOptions) error {
		if err := validHost(host); err != nil {
			return err
		}
		o.host, o.hostView = host, true
		return nil
	}
}

// WithHostTTL sets the TTL of the host's lease (DefaultHostTTL unless set);
// etcd rounds it up to whole seconds and to its minimum TTL.
func WithHostTTL(d time.Duration) EtcdOpt {
	return func(o *etcdOptions) error {
		if d < time.Second {
			return fmt.Errorf("host TTL %v is under a second: %w", d, errdefs.ErrInvalidArgument)
		}
		o.hostTTL = d
		return nil
	}
}

// validHost refuses host identities that are not one path element of
// plain characters.
func validHost(host string) error {
	if host == "" || len(host) > maxHostName {
		return fmt.Errorf("host identity must be 1 to %d bytes, not %d: %w", maxHostName, len(host), errdefs.ErrInvalidArgument)
	}
	for _, c := range []byte(host) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte(".-_:", c) >= 0) {
			return fmt.Errorf("host identity %q may hold only letters, digits and \".-_:\": %w", host, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// etcdHost is the host scope of an open store.
type etcdHost struct {
	name string
	// lease is the host's lease, 0 for a view; lockRev is the mod revision
	// of the lock key this store put, which every commit compares.
	lease   clientv3.LeaseID
	lockRev int64
	lessor  clientv3.Lease
	stop    context.CancelFunc
	expired atomic.Bool
	done    chan struct{}
}

// openScope checks the root's scoping against opts and, WithHost, takes
// the host's lease. It returns nil for a root without host scopes.
func (e *etcdEngine) openScope(ctx context.Context) (*etcdHost, error) {
	if e.opts.host == "" {
		// Checked by the first transaction (checkUnscoped): opening a
		// store without host scopes needs no round trip.
		return nil, nil
	}
	if e.opts.hostView {
		return e.openView(ctx)
	}
	if err := e.claimHostScoped(ctx); err != nil {
		return nil, err
	}
	return e.takeLease(ctx)
}

// openView checks, in one read, that the root is host-scoped and lists
// the host: a view of a host that never opened the root would write
// records of no host.
func (e *etcdEngine) openView(ctx context.Context) (*etcdHost, error) {
	var resp *clientv3.TxnResponse
	err := e.call(ctx, func(ctx context.Context) (err error) {
		resp, err = e.kv.Txn(ctx).Then(clientv3.OpGet(e.keys.mode()), clientv3.OpGet(e.keys.host(e.opts.host))).Commit()
		return err
	})
	if err != nil {
		return nil, err
	}
	scoped, err := e.modeOf(resp.Responses[0].GetResponseRange().GetKvs())
	switch {
	case err != nil:
		return nil, err
	case !scoped:
		return nil, fmt.Errorf("etcd root %q is not host-scoped: %w", e.root, ErrScopeMismatch)
	case len(resp.Responses[1].GetResponseRange().GetKvs()) == 0:
		return nil, fmt.Errorf("host %q has never opened etcd root %q (or was released): %w", e.opts.host, e.root, errdefs.ErrNotFound)
	}
	return &etcdHost{name: e.opts.host}, nil
}

// checkUnscoped refuses, once per store, a host-scoped root opened
// without a host; the first transaction pays one round trip for it.
func (e *etcdEngine) checkUnscoped(ctx context.Context) error {
	if e.opts.host != "" || e.unscopedChecked.Load() {
		return nil
	}
	var resp *clientv3.GetResponse
	err := e.call(ctx, func(ctx context.Context) (err error) {
		resp, err = e.kv.Get(ctx, e.keys.mode())
		return err
	})
	if err != nil {
		return err
	}
	scoped, err := e.modeOf(resp.Kvs)
	if err != nil {
		return err
	}
	if scoped {
		return fmt.Errorf("etcd root %q is host-scoped: open it with a host identity (WithHost, or WithHostView to inspect): %w", e.root, ErrScopeMismatch)
	}
	e.unscopedChecked.Store(true)
	return nil
}

// modeOf reads the mode key as etcd returned it: whether the root is
// host-scoped; a value this package never writes is ErrCorrupt.
func (e *etcdEngine) modeOf(kvs []*mvccpb.KeyValue) (scoped bool, err error) {
	if len(kvs) == 0 {
		return false, nil
	}
	if v := string(kvs[0].Value); v != modeHosts {
		return false, fmt.Errorf("etcd root %q has unknown mode %q: %w", e.root, v, ErrCorrupt)
	}
	return true, nil
}

// claimHostScoped makes the root host-scoped, in one Txn that holds only
// while the root has no snapshots outside scopes.
func (e *etcdEngine) claimHostScoped(ctx context.Context) error {
	start, end := newEtcdKeys(e.root).snapshotRange()
	var resp *clientv3.TxnResponse
	err := e.call(ctx, func(ctx context.Context) (err error) {
		resp, err = e.kv.Txn(ctx).If(
			clientv3.Compare(clientv3.CreateRevision(e.keys.mode()), "=", 0),
			// Holds on an empty range too: etcd compares it as one absent key.
			clientv3.Compare(clientv3.CreateRevision(start), "=", 0).WithRange(end),
		).Then(clientv3.OpPut(e.keys.mode(), modeHosts)).Else(clientv3.OpGet(e.keys.mode())).Commit()
		return err
	})
	if err != nil {
		return err
	}
	if resp.Succeeded {
		return nil
	}
	if scoped, err := e.modeOf(resp.Responses[0].GetResponseRange().GetKvs()); scoped || err != nil {
		return err
	}
	return fmt.Errorf("etcd root %q holds snapshots without host scopes; a root serves one containerd, or many hosts from the start: %w", e.root, ErrScopeMismatch)
}

// takeLease grants the host's lease and puts the lock key under it, unless
// another store of the host holds the lock, and keeps the lease alive.
func (e *etcdEngine) takeLease(ctx context.Context) (_ *etcdHost, err error) {
	h := &etcdHost{name: e.opts.host, lessor: clientv3.NewLease(e.cli), done: make(chan struct{})}
	defer func() {
		if err != nil {
			_ = h.lessor.Close()
		}
	}()
	ttl := int64((e.opts.hostTTL + time.Second - 1) / time.Second)
	err = e.call(ctx, func(ctx context.Context) error {
		g, err := h.lessor.Grant(ctx, ttl)
		if err == nil {
			h.lease = g.ID
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	lock, hostKey := e.keys.lock(h.name), e.keys.host(h.name)
	var resp *clientv3.TxnResponse
	err = e.call(ctx, func(ctx context.Context) (err error) {
		resp, err = e.kv.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(lock), "=", 0)).Then(
			clientv3.OpPut(lock, strconv.FormatInt(int64(h.lease), 10), clientv3.WithLease(h.lease)),
			clientv3.OpTxn(
				[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(hostKey), "=", 0)},
				[]clientv3.Op{clientv3.OpPut(hostKey, strconv.FormatInt(time.Now().Unix(), 10))}, nil),
		).Else(clientv3.OpGet(lock)).Commit()
		return err
	})
	if err == nil && !resp.Succeeded {
		err = fmt.Errorf("host %q of etcd root %q is held by lease %s: %w", h.name, e.root, leaseOf(resp), ErrHostAlive)
	}
	if err != nil {
		revokeCtx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, _ = h.lessor.Revoke(revokeCtx, h.lease)
		cancel()
		return nil, err
	}
	h.lockRev = resp.Header.Revision
	keepCtx, stop := context.WithCancel(context.Background())
	alive, err := h.lessor.KeepAlive(keepCtx, h.lease)
	if err != nil {
		stop()
		revokeCtx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, _ = h.lessor.Revoke(revokeCtx, h.lease)
		cancel()
		return nil, mapEtcdErr(err)
	}
	h.stop = stop
	go func() {
		defer close(h.done)
		for range alive {
		}
		// The channel closes when the lease is gone or when Close stops it.
		if keepCtx.Err() == nil {
			h.expired.Store(true)
		}
	}()
	return h, nil
}

func leaseOf(resp *clientv3.TxnResponse) string {
	if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) > 0 {
		return string(kvs[0].Value)
	}
	return "(gone since)"
}

// release ends the host's lease, so that the host is seen gone at once.
func (h *etcdHost) release() error {
	if h == nil || h.lessor == nil {
		return nil
	}
	h.stop()
	<-h.done
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := h.lessor.Revoke(ctx, h.lease)
	// A lease etcd no longer knows has expired or was revoked from outside
	// (before the keep-alives noticed): the host is gone, as Close wants.
	if err != nil && !h.expired.Load() && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		err = fmt.Errorf("failed to release the lease of host %q: %w", h.name, mapEtcdErr(err))
	} else {
		err = nil
	}
	return errors.Join(err, h.lessor.Close())
}

// HostOf returns the host whose scope ms is, for a store opened WithHost
// or WithHostView, also behind a wrapper that passes TransactionContext
// on; ok is false for any other store (bbolt, etcd without host scopes,
// another package's MetaStore, a wrapped store that is closed). A store of
// this package is asked nothing; behind a wrapper it begins and rolls back
// a read-only transaction, which costs no request on a host-scoped store
// (on an etcd store without host scopes, the store's first transaction
// reads the root's mode).
func HostOf(ms MetaStore) (host string, ok bool) {
	if ms == nil {
		return "", false
	}
	if m, ours := ms.(*metaStore); ours {
		if e, isEtcd := m.eng.(*etcdEngine); isEtcd && e.host != nil {
			return e.host.name, true
		}
		return "", false
	}
	// Behind a wrapper: ask a transaction.
	ctx, cancel := context.WithTimeout(context.Background(), DefaultEtcdRequestTimeout)
	defer cancel()
	_, tr, err := ms.TransactionContext(ctx, false)
	if err != nil {
		return "", false
	}
	defer tr.Rollback()
	t, ours := tr.(*transaction)
	if !ours {
		return "", false
	}
	sx, scopes := t.tx.(scopedTx)
	if !scopes {
		return "", false
	}
	return sx.scopeHost()
}

// fenced reports whether commits must hold the lease.
func (h *etcdHost) fenced() bool { return h != nil && h.lease != 0 }

// HostInfo describes one host of a host-scoped root.
type HostInfo struct {
	// Name is the host identity.
	Name string
	// Since is when a store of the host first opened the root.
	Since time.Time
	// Alive is whether a store of the host holds its lease now; Lease is
	// that lease and TTL what is left of it (zero when not alive).
	Alive bool
	Lease clientv3.LeaseID
	TTL   time.Duration
}

// ListHosts returns the hosts of a host-scoped root in name order, with
// their liveness, in one read (and one lease query per live host). A root
// without host scopes has none, and is reported by ok false.
func ListHosts(ctx context.Context, cli *clientv3.Client, root string) (hosts []HostInfo, ok bool, err error) {
	if cli == nil {
		return nil, false, fmt.Errorf("nil etcd client: %w", errdefs.ErrInvalidArgument)
	}
	if err := checkRoot(root); err != nil {
		return nil, false, err
	}
	keys := newEtcdKeys(root)
	e := &etcdEngine{cli: cli, kv: cli.KV, keys: keys, root: root, opts: defaultEtcdOptions()}
	var resp *clientv3.TxnResponse
	prefix := keys.prefix + KeyEtcdHosts + "/"
	err = e.call(ctx, func(ctx context.Context) (err error) {
		resp, err = e.kv.Txn(ctx).Then(clientv3.OpGet(keys.mode()), clientv3.OpGet(prefix, clientv3.WithPrefix())).Commit()
		return err
	})
	if err != nil {
		return nil, false, err
	}
	if scoped, err := e.modeOf(resp.Responses[0].GetResponseRange().GetKvs()); !scoped || err != nil {
		return nil, false, err
	}
	byName := map[string]*HostInfo{}
	for _, kv := range resp.Responses[1].GetResponseRange().GetKvs() {
		rest := string(kv.Key[len(prefix):])
		name, isLock := strings.CutSuffix(rest, "/"+KeyLock)
		if validHost(name) != nil {
			return nil, true, fmt.Errorf("hosts key %q is no host's: %w", kv.Key, ErrCorrupt)
		}
		h := byName[name]
		if h == nil {
			h = &HostInfo{Name: name}
			byName[name] = h
		}
		if !isLock {
			if s, err := strconv.ParseInt(string(kv.Value), 10, 64); err == nil {
				h.Since = time.Unix(s, 0).UTC()
			}
			continue
		}
		h.Alive, h.Lease = true, clientv3.LeaseID(kv.Lease)
		err := e.call(ctx, func(ctx context.Context) error {
			ttl, err := cli.TimeToLive(ctx, h.Lease)
			if err == nil && ttl.TTL > 0 {
				h.TTL = time.Duration(ttl.TTL) * time.Second
			}
			return err
		})
		if err != nil {
			return nil, true, err
		}
	}
	for _, name := range slices.Sorted(maps.Keys(byName)) {
		hosts = append(hosts, *byName[name])
	}
	return hosts, true, nil
}
