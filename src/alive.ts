// Whether a process of this host is alive, by its pid.

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (error) {
    // EPERM: alive, as another user.
    return (error as NodeJS.ErrnoException).code === 'EPERM'
  }
}
