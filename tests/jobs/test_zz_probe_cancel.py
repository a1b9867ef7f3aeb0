from tests.jobs.test_agent_stream import *  # noqa
from tests.jobs.test_agent_stream import Agent, run, shed  # noqa


def test_probe_cancel_before_the_agent_reports_it_running(shed, renter):
    unit, credential = shed

    async def scenario():
        agent = Agent(credential)
        await agent.connect()
        await agent.beat()
        job = await sync_to_async(job_make)(renter, gpu_count=1)
        await sync_to_async(job_place)(job_id=job.pk)
        assignment = await agent.push("assignment")
        allocation_id = assignment["allocation_id"]
        started = await agent.call(protocol.allocation_path(allocation_id, "start"), {})
        assert started["status"] == 200
        # no heartbeat naming it yet: the agent beats every 5-20 s
        await sync_to_async(job_cancel)(job=await sync_to_async(type(job).objects.get)(pk=job.pk), actor="test")
        while True:
            state = await agent.push("state")
            if allocation_id in state["cancel"]:
                break
        await agent.disconnect()

    run(scenario())
