package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/internal/storeaddr"
)

const (
	// dialProbeTimeout bounds the dial that tells a live socket from a
	// stale one.
	dialProbeTimeout = time.Second
	// cancelGrace is how long cancelled calls get to return after
	// --shutdown-timeout, before the daemon gives up on closing the store.
	cancelGrace = 5 * time.Second
	// closeTimeout bounds closing the driver and the store.
	closeTimeout = 10 * time.Second
)

// daemon is a running snapshotter service.
type daemon struct {
	socket   string
	sockInfo fs.FileInfo // the socket file this daemon made
	srv      *grpc.Server
	sn       snapshots.Snapshotter
	inflight atomic.Int64
}

// serve starts the daemon described by cfg, serves until a signal arrives
// on sigs, and shuts down. It returns nil after a clean stop.
func serve(cfg *config, sigs <-chan os.Signal) error {
	ctx := context.Background()
	logger := log.L.WithField("socket", cfg.socket)

	// The socket comes first: a second daemon started by mistake is told
	// the socket is taken, not that the store is locked.
	if err := claimSocket(cfg.socket); err != nil {
		return err
	}
	addr, err := storeaddr.Parse(cfg.store)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.root, 0o700); err != nil {
		return fmt.Errorf("data root: %w", err)
	}
	locks, err := lockRoot(cfg.root, cfg.host)
	if err != nil {
		return err
	}
	// Released when the process ends, however it ends.
	defer func() {
		for _, l := range locks {
			l.Close()
		}
	}()
	recorded, err := checkDriver(cfg.root, cfg.driver)
	if err != nil {
		return err
	}
	ms, err := openStore(ctx, cfg, addr, sigs)
	if err != nil {
		return err
	}
	sn, err := drivers[cfg.driver](cfg.root, ms)
	if err != nil {
		_ = ms.Close()
		return fmt.Errorf("driver %s: %w", cfg.driver, err)
	}
	// Recorded only now that the driver has made the root its own: a start
	// that failed earlier (a store that does not answer) binds the root to
	// no driver.
	if !recorded {
		if err := recordDriver(cfg.root, cfg.driver); err != nil {
			_ = sn.Close()
			return err
		}
	}
	// Without a host no lease expires: the watch never fires.
	watch := newExpiryWatch(sn)
	d := &daemon{socket: cfg.socket, sn: watch}
	l, err := d.listen()
	if err != nil {
		_ = sn.Close()
		return err
	}
	// WaitForHandlers: once Stop returns no handler touches the store, so
	// closing it cannot pull it from under a call.
	d.srv = grpc.NewServer(
		grpc.ChainUnaryInterceptor(d.unaryInterceptor),
		grpc.ChainStreamInterceptor(d.streamInterceptor),
		grpc.WaitForHandlers(true),
	)
	snapshotsapi.RegisterSnapshotsServer(d.srv, snapshotservice.FromSnapshotter(watch))
	serveErr := make(chan error, 1)
	go func() { serveErr <- d.srv.Serve(l) }()
	logger.WithFields(log.Fields{"driver": cfg.driver, "root": cfg.root, "store": addr.String(), "host": cfg.host, "version": versionString()}).Info("serving")

	var failure error
	select {
	case sig := <-sigs:
		logger.WithField("signal", sig.String()).Info("shutting down: no new calls; waiting for the calls under way")
	case err := <-serveErr:
		// Serve returns before a stop only when accepting fails.
		logger.WithError(err).Error("serving failed; shutting down")
		failure = fmt.Errorf("serving: %w", err)
	case <-watch.expired:
		logger.WithError(watch.cause).WithField("host", cfg.host).Error("the host's lease expired: the store refuses every write; shutting down so that a new daemon takes a new lease")
		failure = &exitError{code: 1, err: fmt.Errorf("host %s: %w", cfg.host, watch.cause)}
	}
	done := make(chan error, 1)
	go func() { done <- d.shutdown(cfg.shutdownTimeout) }()
	select {
	case err := <-done:
		if err != nil {
			return err
		}
		logger.Info("stopped")
		return failure
	case sig := <-sigs:
		n := d.inflight.Load()
		logger.WithFields(log.Fields{"signal": sig.String(), "calls": n}).Warn("second signal: exiting at once")
		d.removeSocket()
		return &exitError{code: 1, err: fmt.Errorf("exited at once on a second signal (%s), %d call(s) under way", sig, n)}
	}
}

// shutdown stops the server, letting calls under way finish for up to
// timeout and then cancelling them, closes the driver (and with it the
// store) and removes the socket.
func (d *daemon) shutdown(timeout time.Duration) error {
	logger := log.L.WithField("socket", d.socket)
	stopped := make(chan struct{})
	go func() {
		d.srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(timeout):
		logger.WithField("calls", d.inflight.Load()).Warnf("calls still under way after %v: cancelling them", timeout)
		// Stop may run alongside GracefulStop; both return once every
		// handler has (WaitForHandlers).
		go d.srv.Stop()
		select {
		case <-stopped:
		case <-time.After(cancelGrace):
			d.removeSocket()
			return fmt.Errorf("%d call(s) did not return within %v of being cancelled; the store was not closed", d.inflight.Load(), cancelGrace)
		}
	}
	d.removeSocket()
	closed := make(chan error, 1)
	go func() { closed <- d.sn.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			return fmt.Errorf("closing the store: %w", err)
		}
	case <-time.After(closeTimeout):
		return fmt.Errorf("the store did not close within %v", closeTimeout)
	}
	return nil
}

// claimSocket makes sure no process serves path, and removes a socket file
// that nobody serves (left by a daemon that was killed). Anything at path
// other than a socket is left alone and refused.
func claimSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket; refusing to replace it", path)
	}
	conn, err := net.DialTimeout("unix", path, dialProbeTimeout)
	if err == nil {
		_ = conn.Close()
		return fmt.Errorf("%s is in use: another process serves it (another snapmeta-snapshotter?)", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		// A full backlog, a permission problem: someone may be there.
		return fmt.Errorf("%s: cannot tell whether another process serves it: %w", path, err)
	}
	log.L.WithField("socket", path).Info("replacing a stale socket")
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing stale socket: %w", err)
	}
	return nil
}

// listen creates the socket, readable and writable by its owner and group
// only (containerd's own socket has the same mode).
func (d *daemon) listen() (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(d.socket), 0o711); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: d.socket, Net: "unix"})
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			// Another daemon bound it since claimSocket looked.
			return nil, fmt.Errorf("%s is in use: another process serves it (another snapmeta-snapshotter?)", d.socket)
		}
		return nil, fmt.Errorf("socket: %w", err)
	}
	// The socket is removed by removeSocket, which checks that it is still
	// ours: a successor may have replaced it.
	l.SetUnlinkOnClose(false)
	if d.sockInfo, err = os.Lstat(d.socket); err != nil {
		_ = l.Close()
		return nil, fmt.Errorf("socket: %w", err)
	}
	if err := os.Chmod(d.socket, 0o660); err != nil {
		_ = l.Close()
		d.removeSocket()
		return nil, fmt.Errorf("socket: %w", err)
	}
	return l, nil
}

// removeSocket removes the socket file if it is still the one this daemon
// made.
func (d *daemon) removeSocket() {
	fi, err := os.Lstat(d.socket)
	if err != nil || d.sockInfo == nil || !os.SameFile(fi, d.sockInfo) {
		return
	}
	if err := os.Remove(d.socket); err != nil && !errors.Is(err, fs.ErrNotExist) {
		log.L.WithError(err).WithField("socket", d.socket).Warn("failed to remove socket")
	}
}

// hostRetryInterval is how often a daemon whose host is still alive tries
// again to open the store.
const hostRetryInterval = 500 * time.Millisecond

// openStore opens the store, in the scope of cfg.host if set. A host that
// is still alive (a restart after a crash, within --host-ttl) is waited
// for: the daemon tries again until the TTL and a few seconds have passed,
// or a signal arrives.
func openStore(ctx context.Context, cfg *config, addr storeaddr.Address, sigs <-chan os.Signal) (storage.MetaStore, error) {
	var opts []storage.EtcdOpt
	if cfg.host != "" {
		opts = append(opts, storage.WithHost(cfg.host), storage.WithHostTTL(cfg.hostTTL))
	}
	// The lease a crashed daemon left runs out within the TTL (rounded up
	// to whole seconds), and etcd expires it within a second or two more.
	deadline := time.Now().Add(cfg.hostTTL + 5*time.Second)
	for attempt := 1; ; attempt++ {
		ms, err := storeaddr.Open(ctx, addr, storeaddr.ReadWrite, &cfg.etcd, opts...)
		if err == nil {
			return ms, nil
		}
		if !errors.Is(err, storage.ErrHostAlive) || time.Now().After(deadline) {
			return nil, fmt.Errorf("cannot open the store: %w", err)
		}
		if attempt == 1 {
			log.L.WithError(err).WithFields(log.Fields{"host": cfg.host, "host-ttl": cfg.hostTTL}).
				Warn("host is still alive: another daemon of this host holds its lease, or one that crashed held it within --host-ttl; waiting for the lease to expire")
		}
		select {
		case sig := <-sigs:
			return nil, fmt.Errorf("stopped by %s while waiting for host %q to be released: %w", sig, cfg.host, err)
		case <-time.After(hostRetryInterval):
		}
	}
}

// lockRoot locks the data root for as long as the returned files are
// open. Two daemons on one root would build and delete each other's
// directories; a bbolt store would refuse the second, an etcd store would
// not. Without a host the lock on the root is exclusive. With one (a root
// shared by the daemons of several hosts) the lock on the root is shared,
// so that no daemon without a host uses it meanwhile, and the lock on
// <root>/hosts/<host>.lock exclusive, so that each host has one daemon.
func lockRoot(root, host string) ([]*os.File, error) {
	how := syscall.LOCK_EX
	if host != "" {
		how = syscall.LOCK_SH
	}
	f, err := lockFile(root, how, false)
	if err != nil {
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("data root %s is in use by another snapmeta-snapshotter", root)
		}
		return nil, fmt.Errorf("locking data root %s: %w", root, err)
	}
	if host == "" {
		return []*os.File{f}, nil
	}
	if err := os.MkdirAll(filepath.Join(root, "hosts"), 0o700); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("data root: %w", err)
	}
	h, err := lockFile(filepath.Join(root, "hosts", host+".lock"), syscall.LOCK_EX, true)
	if err != nil {
		_ = f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("host %s of data root %s is in use by another snapmeta-snapshotter", host, root)
		}
		return nil, fmt.Errorf("locking host %s of data root %s: %w", host, root, err)
	}
	return []*os.File{f, h}, nil
}

// lockFile opens path (creating a file if create) and flocks it without
// waiting.
func lockFile(path string, how int, create bool) (*os.File, error) {
	var f *os.File
	var err error
	if create {
		f, err = os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o600)
	} else {
		f, err = os.Open(path)
	}
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), how|syscall.LOCK_NB); err != nil {
		_ = f.Close()
		return nil, err
	}
	return f, nil
}

// checkDriver refuses a root that <root>/driver says another driver made:
// each driver lays out its snapshot directories its own way, so a root is
// only ever read by the driver that wrote it. It reports whether the root
// records a driver already.
func checkDriver(root, driver string) (recorded bool, err error) {
	p := filepath.Join(root, "driver")
	b, err := os.ReadFile(p)
	switch {
	case err == nil:
		if got := strings.TrimSpace(string(b)); got != driver {
			return true, fmt.Errorf("%s belongs to driver %q, not %q (see %s): use --driver %s or another --root", root, got, driver, p, got)
		}
		return true, nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	default:
		return false, fmt.Errorf("data root: %w", err)
	}
}

// recordDriver records in <root>/driver which driver made root.
func recordDriver(root, driver string) error {
	if err := os.WriteFile(filepath.Join(root, "driver"), []byte(driver+"\n"), 0o600); err != nil {
		return fmt.Errorf("data root: %w", err)
	}
	return nil
}

// unaryInterceptor counts calls under way and logs each at debug level,
// and its failure at warning level when the fault is on this side.
func (d *daemon) unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	done := d.begin(ctx, info.FullMethod)
	resp, err := handler(ctx, req)
	done(err)
	return resp, err
}

func (d *daemon) streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	done := d.begin(ss.Context(), info.FullMethod)
	err := handler(srv, ss)
	done(err)
	return err
}

func (d *daemon) begin(ctx context.Context, method string) func(error) {
	d.inflight.Add(1)
	start := time.Now()
	l := log.G(ctx).WithField("call", path.Base(method))
	l.Debug("call started")
	return func(err error) {
		d.inflight.Add(-1)
		l = l.WithField("duration", time.Since(start))
		switch status.Code(err) {
		case codes.OK:
			l.Debug("call done")
		case codes.NotFound, codes.AlreadyExists, codes.FailedPrecondition, codes.InvalidArgument, codes.Canceled, codes.Unimplemented:
			// containerd asks for what may not exist, cancels, and calls
			// Cleanup after every collection whether the driver has it
			// or not.
			l.WithError(err).Debug("call refused")
		default:
			l.WithError(err).Warn("call failed")
		}
	}
}
